"""How a task's prompt becomes the model's context: as plain text (base
models, the default) or, with --apply-chat-template, as one user turn of the
tokenizer's own chat template with the assistant's turn opened (instruct
models: Llama 3.x Instruct, Qwen2.5 Instruct, ...), as lm-evaluation-harness's
--apply_chat_template does. The scored answer or the generation follows the
rendered prompt.

    render, settings = chat_prompts(args, lm.tokenizer)   # from the flags; settings: the results' entry
    text, prefix = render(prompt)     # the context text, and the ids put before its tokens

Plain prompts get the tokenizer's document prefix ([BOS] where training data
has one). A rendered prompt carries the template's own special tokens as text
(<|begin_of_text|>, <|im_start|>, ...): it is tokenized with special tokens
parsed and nothing added, so its ids are `apply_chat_template(tokenize=True)`'s.
"""

from typing import Callable, List, Optional, Tuple

from megatron.training.data.sft_templates import tokenizer_chat_template
from tasks.lm import EvalError, document_prefix

CHAT_TASKS = ("fineval", "fingpt", "ner")


def add_chat_args(group) -> None:
    group.add_argument("--apply-chat-template", action="store_true",
                       help="fineval, fingpt, ner: render each prompt as one user turn of the tokenizer's chat "
                            "template, assistant turn opened (instruct models)")
    group.add_argument("--system-instruction", default=None,
                       help="with --apply-chat-template: a system turn before each prompt")


def check_chat_args(args) -> None:
    if args.system_instruction is not None and not args.apply_chat_template:
        raise EvalError("--system-instruction goes into the chat template's system turn: add --apply-chat-template")
    if args.apply_chat_template and args.task not in CHAT_TASKS:
        raise EvalError(f"--apply-chat-template applies to --task {', '.join(CHAT_TASKS)}; --task {args.task} "
                        + ("renders prompts as preprocessing did (--chat-template)" if args.task == "answers"
                           else "scores documents, not prompts") + ": drop the flag")


def prompt_renderer(tokenizer, apply_chat_template: bool = False,
                    system_instruction: Optional[str] = None) -> Callable[[str], Tuple[str, List[int]]]:
    if not apply_chat_template:
        prefix = document_prefix(tokenizer)
        return lambda prompt: (prompt, prefix)
    if not tokenizer_chat_template(tokenizer):
        where = getattr(tokenizer, "model_path", None) or "this one"
        raise EvalError(f"--apply-chat-template: the tokenizer ({where}) "
                        "has no chat template (chat_template in tokenizer_config.json, or chat_template.jinja): "
                        "drop the flag for a base model")
    hf = tokenizer.hf_tokenizer
    head = [{"role": "system", "content": system_instruction}] if system_instruction else []

    def render(prompt: str) -> Tuple[str, List[int]]:
        messages = head + [{"role": "user", "content": prompt}]
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), []

    return render


def chat_prompts(args, tokenizer) -> Tuple[Callable[[str], Tuple[str, List[int]]], dict]:
    """(the renderer the flags ask for, the run's settings entry: partial results made without the
    template do not mix with these)."""
    render = prompt_renderer(tokenizer, args.apply_chat_template, args.system_instruction)
    settings = {"chat_template": {"system_instruction": args.system_instruction}} if args.apply_chat_template else {}
    return render, settings
