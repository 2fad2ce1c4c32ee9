"""One interface over the two kinds of model the tasks evaluate:

    lm = build_language_model(args)     # --load CKPT (Megatron, any TP/PP) or --hf-model DIR
    logprobs = lm.log_probs(tokens)     # [batch, seq, vocab] fp32 log-softmax, on CPU
    lm.tokenizer, lm.vocab_size, lm.is_writer, lm.close()

Log-probabilities are normalised over the tokenizer's vocabulary: the rows a
Megatron checkpoint adds to make the embedding divisible by
--make-vocab-size-divisible-by x TP are not words and are left out, so a
checkpoint and its HF export (which has no padding rows) give the same numbers.

Megatron models are collective (megatron/training/inference.py): every rank of
a torchrun job builds the same LanguageModel, makes the same calls and gets
the same results; only `is_writer` (global rank 0) writes files.
"""

import argparse
import os
from typing import List, Optional

import torch

from megatron.training.errors import UserError


class EvalError(UserError, ValueError):
    """A problem with the evaluation inputs; the message says what to change."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--load", help="a Megatron checkpoint directory (any TP/PP; launch with torchrun for TP x PP > 1)")
    g.add_argument("--hf-model", help="a Hugging Face model directory (e.g. one exported with --saver hf)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="position interpolation factor for this evaluation, overriding the checkpoint's "
                        "(1: none; HF models: linear rope scaling)")
    g.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (log-softmax stays fp32)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass")
    g = parser.add_argument_group("tokenizer (default: the one the checkpoint records / the HF directory's)")
    g.add_argument("--tokenizer-type", default=None,
                   help="Llama2Tokenizer, SentencePieceTokenizer, HuggingFaceTokenizer, GPT2BPETokenizer, NullTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: number of token ids")


class LanguageModel:
    """Base: subclasses set tokenizer / vocab_size and implement `_logits`."""

    tokenizer = None
    vocab_size: int = 0
    is_writer: bool = True

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(next token | prefix) for token ids [batch, seq]: [batch, seq, vocab_size], fp32, CPU."""
        logits = self._logits(tokens)[..., : self.vocab_size].float()
        return torch.log_softmax(logits, dim=-1).cpu()

    def close(self) -> None:
        pass


class MegatronLanguageModel(LanguageModel):
    """A Megatron checkpoint through the training driver's own model and loader."""

    def __init__(self, args):
        from megatron.training import inference
        from megatron.training.checkpoint.save_load import read_checkpoint_args

        saved = read_checkpoint_args(args.load)
        extra = []
        if args.rotary_seq_len_interpolation_factor is not None:
            extra += ["--rotary-seq-len-interpolation-factor", str(args.rotary_seq_len_interpolation_factor)]
        if args.bf16:
            extra.append("--bf16")
        self.tokenizer = _tokenizer_for_checkpoint(args, saved)
        self.vocab_size = check_vocab(self.tokenizer, saved, args.load)  # before the (slow) model load
        self._args, self._model = inference.load_model(args.load, args.tensor_model_parallel_size,
                                                       args.pipeline_model_parallel_size, extra)
        self.is_writer = torch.distributed.get_rank() == 0
        self.interpolation_factor = self._args.rotary_seq_len_interpolation_factor

    def _logits(self, tokens):
        from megatron.training import inference

        return inference.forward_logits(self._args, self._model, tokens)

    def close(self):
        from megatron.training import inference

        self._model = None
        inference.unload()


class HFLanguageModel(LanguageModel):
    """A `transformers` causal LM from a local directory."""

    def __init__(self, args):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.hf_model, local_files_only=True)
        factor = args.rotary_seq_len_interpolation_factor
        if factor is not None:
            set_hf_linear_rope_factor(config, factor)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        self._model = AutoModelForCausalLM.from_pretrained(args.hf_model, config=config, dtype=dtype,
                                                           local_files_only=True).eval()
        self.tokenizer = _tokenizer_for_hf(args)
        self.vocab_size = _tokenizer_vocab(self.tokenizer)
        if self.vocab_size > config.vocab_size:
            raise EvalError(
                f"the tokenizer has {self.vocab_size} tokens but {args.hf_model} has {config.vocab_size} embedding "
                "rows: use the tokenizer the model was trained with (drop --tokenizer-type/--tokenizer-model to "
                "use the directory's own)")
        self.interpolation_factor = factor if factor is not None else linear_rope_factor(config)
        self.is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def _logits(self, tokens):
        return self._model(tokens).logits


def linear_rope_factor(config) -> Optional[float]:
    """The position interpolation factor of an HF config: its linear rope scaling factor, else None."""
    from megatron.training.checkpoint_convert.llama import rope_scaling

    _, kind, scaling = rope_scaling(config.to_dict())
    return float(scaling["factor"]) if kind == "linear" else None


def set_hf_linear_rope_factor(config, factor: float) -> None:
    """Linear rope scaling (position interpolation) by `factor` on an HF config
    (factor 1: plain rope), for transformers 4.x (`rope_scaling`) and 5.x (`rope_parameters`)."""
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
    theta = 10000.0 if theta is None else theta
    scaled = {"rope_type": "linear", "factor": float(factor)} if factor != 1 else {"rope_type": "default"}
    if params is not None or hasattr(config, "rope_parameters"):
        config.rope_parameters = dict(scaled, rope_theta=theta)
    else:
        config.rope_scaling = scaled if factor != 1 else None


def build_language_model(args) -> LanguageModel:
    if bool(args.load) == bool(args.hf_model):
        raise EvalError("give exactly one model: --load MEGATRON_CHECKPOINT_DIR or --hf-model HF_DIR")
    path = args.load or args.hf_model
    if not os.path.isdir(path):
        raise EvalError(f"{path} is not a directory: give a checkpoint directory")
    if args.load and os.path.isfile(os.path.join(path, "config.json")):
        raise EvalError(f"--load {path} is a Hugging Face model directory: evaluate it with --hf-model {path} "
                        "(--load takes Megatron checkpoints)")
    return MegatronLanguageModel(args) if args.load else HFLanguageModel(args)


# ------------------------------------------------------------------ tokenizers

def _build(kind, model, args, vocab_size=None, legacy=True):
    from megatron.training.tokenizer import build_tokenizer

    # legacy=True: the driver builds its tokenizer this way, so the vocabulary
    # size (SentencePieceTokenizer's appended specials) is the trained one.
    return build_tokenizer(kind, model, args.vocab_file, args.merge_file,
                           args.vocab_size if args.vocab_size is not None else vocab_size, legacy=legacy)


def data_tokenizer(args):
    """The evaluated model's tokenizer as the data tools build it (legacy=False:
    no special token added implicitly), to render prompts exactly as
    preprocessing rendered the training data; None for a --mock-data checkpoint."""
    if args.load:
        from megatron.training.checkpoint.save_load import read_checkpoint_args

        return _tokenizer_for_checkpoint(args, read_checkpoint_args(args.load), legacy=False)
    return _tokenizer_for_hf(args, legacy=False)


def _tokenizer_for_checkpoint(args, saved: dict, legacy: bool = True):
    kind = args.tokenizer_type or saved.get("tokenizer_type")
    if kind is None:
        return None  # a --mock-data checkpoint: token ids in, no text
    model = args.tokenizer_model or (saved.get("tokenizer_model") if not args.tokenizer_type else None)
    if args.vocab_file is None and not args.tokenizer_type:
        args.vocab_file, args.merge_file = saved.get("vocab_file"), saved.get("merge_file")
    if model and not os.path.exists(model):
        raise EvalError(f"the checkpoint's tokenizer {model} does not exist here: pass --tokenizer-type and "
                        "--tokenizer-model for a copy of it")
    return _build(kind, model, args, saved.get("vocab_size"), legacy)


def _tokenizer_for_hf(args, legacy: bool = True):
    if args.tokenizer_type:
        return _build(args.tokenizer_type, args.tokenizer_model, args, legacy=legacy)
    from megatron.training.checkpoint_convert.llama import find_tokenizer

    found = find_tokenizer(args.hf_model, args.tokenizer_model)
    if found is None:
        raise EvalError(f"{args.hf_model} has no tokenizer files: pass --tokenizer-type and --tokenizer-model")
    return _build(found[0], found[1], args, legacy=legacy)


def _tokenizer_vocab(tokenizer) -> int:
    return tokenizer.vocab_size


def check_vocab(tokenizer, saved: dict, load_dir: str) -> int:
    """The vocabulary to normalise over; an error naming the fix when the
    tokenizer is not the one the checkpoint was trained with."""
    from megatron.training.checkpoint.settings import vocabulary_difference
    from megatron.training.sizes import padded_vocab_size
    from megatron.training.tokenizer import model_vocabulary

    rows = saved["padded_vocab_size"]
    if tokenizer is None:
        return saved.get("vocab_size") or rows
    vocab = _tokenizer_vocab(tokenizer)
    expected = padded_vocab_size(vocab, saved.get("make_vocab_size_divisible_by", 128),
                                 saved.get("tensor_model_parallel_size", 1))
    # a converted model's rows beyond its tokenizer's tokens (Qwen's) are left out like padding: no text has
    # those ids, and its HF export is normalised over the same tokens
    if vocab > rows or vocabulary_difference(saved, model_vocabulary(vocab, saved)) is not None:
        raise EvalError(
            f"vocabulary mismatch: the checkpoint {load_dir} has {rows} embedding rows, which no padding of this "
            f"tokenizer's {vocab} tokens gives (expected {expected}); use the tokenizer the checkpoint was trained "
            f"with (it records --tokenizer-type {saved.get('tokenizer_type')} --tokenizer-model "
            f"{saved.get('tokenizer_model')})")
    return vocab


# ------------------------------------------------------------------ text -> ids

def encode(tokenizer, text: str) -> List[int]:
    """Token ids of `text` with no special tokens added."""
    from megatron.training import tokenizer as tk

    if isinstance(tokenizer, tk.Llama2Tokenizer):  # includes SentencePieceTokenizer
        return tokenizer.tokenize(text, bos=False)
    if isinstance(tokenizer, tk.HuggingFaceTokenizer):
        return list(tokenizer.hf_tokenizer(text, add_special_tokens=False).input_ids)
    return tokenizer.tokenize(text)


def document_prefix(tokenizer) -> List[int]:
    """What training data puts before each document: [BOS] when the tokenizer
    adds one to every text (Llama 2 conventions), else nothing."""
    if tokenizer is None:
        return []
    bos = getattr(tokenizer, "bos", None)
    try:
        first = tokenizer.tokenize("")
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "" adds nothing
        return []
    return [bos] if bos is not None and first[:1] == [bos] else []


def require_tokenizer(lm: LanguageModel, what: str) -> None:
    if lm.tokenizer is None:
        raise EvalError(f"{what} needs a tokenizer and the checkpoint records none: pass --tokenizer-type "
                        "and --tokenizer-model")


def pad_batch(sequences: List[List[int]], pad_id: int = 0) -> torch.Tensor:
    """Right-padded [batch, longest] ids; causal attention means padding after a
    sequence never changes the log-probabilities inside it."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def chunks(items: list, size: int) -> List[list]:
    return [items[i: i + size] for i in range(0, len(items), max(1, size))]
