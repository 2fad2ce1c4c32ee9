"""Convert a checkpoint between formats and parallel layouts, on CPU.

    # Hugging Face Llama (also Llama 3.x, Mistral, Qwen2/2.5, Qwen3: --loader hf) -> Megatron, TP=2 x PP=2
    python tools/checkpoint/util.py --model-type GPT --loader llama2_hf --saver megatron \\
        --load-dir Llama-2-7b-hf --save-dir llama2-7b-tp2-pp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --verify
    # reshard a Megatron checkpoint (loader and saver default to megatron)
    python tools/checkpoint/util.py --model-type GPT --load-dir ckpt-tp2 --save-dir ckpt-tp4 \\
        --target-tensor-parallel-size 4 --target-pipeline-parallel-size 1
    # Megatron -> Hugging Face (safetensors shards, config.json, tokenizer files)
    python tools/checkpoint/util.py --model-type GPT --loader megatron --saver hf --load-dir ckpt --save-dir ckpt-hf
    # BERT / RoBERTa / Megatron-BERT (the HF class from config.json, and back by the heads)
    python tools/checkpoint/util.py --model-type BERT --loader hf --saver megatron --load-dir roberta-base \\
        --save-dir roberta-tp2 --target-tensor-parallel-size 2 --verify
    # either direction between the per-rank torch format and torch_dist (loads under any layout)
    python tools/checkpoint/util.py --model-type GPT --saver torch_dist --load-dir ckpt-tp2 --save-dir ckpt-dist
    python tools/checkpoint/util.py --model-type GPT --load-dir ckpt-dist --save-dir ckpt-tp4 \\
        --target-tensor-parallel-size 4 --target-pipeline-parallel-size 1
    # LoRA adapters: an adapter checkpoint -> peft directory; a peft directory -> adapter checkpoint on our base
    python tools/checkpoint/util.py --model-type GPT --loader megatron --saver peft --load-dir ckpt-lora \\
        --save-dir adapter
    python tools/checkpoint/util.py --model-type GPT --loader peft --saver megatron --load-dir adapter \\
        --base-load-dir llama2-7b-megatron --save-dir ckpt-lora-imported
    (--saver hf on an adapter checkpoint writes the base with the adapters merged in)

Loaders and savers are plugins: tools/checkpoint/loader_<name>.py and
saver_<name>.py, each with FORMAT, ALIASES, add_arguments(parser) and
load_source(args) / save(args, source, out_dir). A new model family is a new
plugin; this file knows none of them. --verify then runs both sides as they
are saved (a Megatron checkpoint as TP x PP processes) on a few hundred tokens
and compares their logits and losses (megatron/training/checkpoint_convert/verify.py).
"""

import argparse
import glob
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root: our megatron.training

from megatron.training.checkpoint_convert.core import ConversionError, convert  # noqa: E402
from megatron.training.errors import Parser, run_main  # noqa: E402


def _import(path: str):
    name = "checkpoint_plugin_" + os.path.splitext(os.path.basename(path))[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def plugin_names(kind: str):
    """The names of the installed loader or saver plugins (tools/checkpoint/<kind>_<name>.py)."""
    return [os.path.basename(p)[len(kind) + 1:-3] for p in sorted(glob.glob(os.path.join(HERE, f"{kind}_*.py")))]


def find_plugin(kind: str, name: str):
    """The module tools/checkpoint/<kind>_<name>.py, or the one listing `name` in its ALIASES."""
    known = plugin_names(kind)
    path = lambda n: os.path.join(HERE, f"{kind}_{n}.py")  # noqa: E731
    if name in known:
        return _import(path(name))
    for n in known:
        if name in getattr(_import(path(n)), "ALIASES", ()):
            return _import(path(n))
    raise ConversionError(f"unknown --{kind} {name!r}: choose one of {', '.join(known)} "
                          f"(or add tools/checkpoint/{kind}_{name}.py)")


def build_parser(loader=None, saver=None) -> Parser:
    """The flags, with those of the `loader` and `saver` plugins (modules) when given."""
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-type", choices=["GPT", "BERT"], required=True,
                   help="GPT: Llama-architecture decoders (Llama 1/2/3.x, Mistral, Qwen2/2.5, Qwen3); BERT: BERT, "
                        "RoBERTa, DistilRoBERTa, Megatron-BERT")
    p.add_argument("--loader", default="megatron",
                   help="loader plugin: megatron (either checkpoint format, detected), hf (the family from "
                        "config.json), llama2_hf (alias llama_hf), peft (a LoRA adapter directory)")
    p.add_argument("--saver", default="megatron",
                   help="saver plugin: megatron (per-rank torch format), torch_dist, hf, peft (the adapters of an "
                        "adapter checkpoint)")
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True, help="must not exist yet (or be empty)")
    p.add_argument("--tokenizer-model", default=None,
                   help="a sentencepiece tokenizer.model file or an HF tokenizer directory")
    p.add_argument("--megatron-path", default=None, help="accepted for script compatibility; not needed")
    p.add_argument("--verify", action="store_true",
                   help="after converting, run both sides as saved (a Megatron checkpoint as TP x PP processes) on "
                        "a few hundred tokens and compare logits and losses")
    p.add_argument("--verify-atol", type=float, default=1e-3,
                   help="--verify fails when a logit differs by more than this")
    for kind, plugin in (("loader", loader), ("saver", saver)):
        if plugin is not None:
            name = plugin.__name__[len(f"checkpoint_plugin_{kind}_"):]
            plugin.add_arguments(p.add_argument_group(f"{kind} {name}"))
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    plugins.add_argument("--loader", default="megatron")
    plugins.add_argument("--saver", default="megatron")
    first, _ = plugins.parse_known_args(argv)
    loader, saver = find_plugin("loader", first.loader), find_plugin("saver", first.saver)
    return build_parser(loader, saver).parse_args(argv), loader, saver


def convert_and_verify(args, loader, saver, source=None) -> None:
    """Save `source` (default: what the loader plugin loads) with the saver plugin, then --verify."""
    source = source or loader.load_source(args)
    convert(source, lambda src, out: saver.save(args, src, out), args.save_dir)
    if args.verify:
        from megatron.training.checkpoint_convert.verify import verify_conversion

        verify_conversion(source, saver.FORMAT, os.path.abspath(args.save_dir), args.verify_atol)


def run(argv=None) -> None:
    convert_and_verify(*parse_args(argv))


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
