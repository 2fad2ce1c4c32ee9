"""Generate synthetic continuations of pretraining documents with a teacher model.

Each document's prefix (by the teacher's tokens or by characters) is the
prompt; the teacher (vLLM when installed with a GPU, else transformers)
writes the continuation. Outputs are jsonl shards under OUT/shards/ with the
prefix, the continuation, `text` (the two joined: what training reads), the
source document id, the teacher and the sampling parameters. Rerunning the
same command resumes: documents already done are skipped. Exit status 3:
some prompts failed after every retry (listed in OUT/failed.jsonl); rerunning
retries them.

    python tools/generate_synthetic_data.py --input data/corpus.jsonl --teacher /models/teacher-hf \\
        --output-dir synth/ --prefix-unit tokens --prefix-length 128 --max-new-tokens 512 \\
        --temperature 0.8 --top-p 0.95 --tensor-parallel-size 8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import ArgumentError, Parser, run_main, sigterm_as_exit  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", help="a .jsonl / .jsonl.gz file, a folder of them, or a quoted glob")
    g.add_argument("--json-key", default="text", help="the text field of a jsonl record")
    g.add_argument("--id-key", default="id",
                   help="the document-id field (records without it get file:line ids; '' always uses file:line)")
    g.add_argument("--input-indexed", metavar="PREFIX",
                   help="read an indexed dataset (PREFIX.bin/.idx) instead, detokenized with --tokenizer-type/-model")
    g.add_argument("--tokenizer-type", help="the tokenizer that wrote --input-indexed (as for preprocess_data.py)")
    g.add_argument("--tokenizer-model", help="its model file or directory")
    g = p.add_argument_group("prompts")
    g.add_argument("--prefix-unit", choices=["tokens", "chars"], default="tokens",
                   help="count the prefix in the teacher's tokens or in characters")
    g.add_argument("--prefix-length", type=int, default=128, help="prefix length, in --prefix-unit")
    g.add_argument("--min-doc-length", type=int,
                   help="skip documents shorter than this, in --prefix-unit (default: --prefix-length)")
    g.add_argument("--no-bos", action="store_true", help="do not prepend the teacher's BOS token to prompts")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=True, help="Hugging Face model directory of the teacher")
    g.add_argument("--teacher-name", help="name recorded with every output (default: the directory's name)")
    g.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto",
                   help="auto: vLLM when it is installed and a GPU is present, else transformers")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM: share of GPU memory to use")
    g.add_argument("--max-model-len", type=int, help="vLLM: context length (default: the model's)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--seed", type=int, default=1234, help="each document samples with seed + crc32(id)")
    g = p.add_argument_group("filters")
    g.add_argument("--min-continuation-tokens", type=int, default=16, help="drop shorter continuations")
    g.add_argument("--max-repetition", type=float, default=0.5,
                   help="drop continuations whose share of repeated token n-grams is above this")
    g.add_argument("--repetition-ngram", type=int, default=3)
    g = p.add_argument_group("output and run")
    g.add_argument("--output-dir", required=True, help="shards, manifest, failures and report go here")
    g.add_argument("--batch-size", type=int, default=16,
                   help="prompts per teacher call (vLLM batches inside a call: give it hundreds)")
    g.add_argument("--docs-per-shard", type=int, default=1000, help="documents per shard (the unit of resuming)")
    g.add_argument("--max-retries", type=int, default=2, help="retries of a failed prompt before it is logged")
    g.add_argument("--max-docs", type=int, help="stop after this many new documents")
    g.add_argument("--log-interval", type=float, default=30.0, help="seconds between progress lines")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    if bool(args.input) == bool(args.input_indexed):
        raise ArgumentError("give exactly one of --input (jsonl) or --input-indexed (an indexed dataset prefix)")
    if args.input_indexed and not args.tokenizer_type:
        raise ArgumentError("--input-indexed needs --tokenizer-type (and --tokenizer-model) of the tokenizer that "
                            "wrote it")
    return args


def run(argv=None) -> int:
    args = get_args(argv)
    from megatron.training.distill.documents import (
        PrefixConfig, PrefixCutter, SourceStats, iter_indexed_documents, iter_jsonl_documents,
    )
    from megatron.training.distill.filters import FilterConfig
    from megatron.training.distill.generate import GenerateConfig, generate_synthetic_data
    from megatron.training.distill.teacher import SamplingConfig, build_teacher
    from megatron.training.tokenizer import build_tokenizer

    prefix_cfg = PrefixConfig(args.prefix_unit, args.prefix_length, args.min_doc_length, not args.no_bos)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    filters = FilterConfig(args.min_continuation_tokens, args.max_repetition, args.repetition_ngram)
    stats = SourceStats()
    if args.input:
        documents = iter_jsonl_documents(args.input, stats, args.json_key, args.id_key or None)
    else:
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        documents = iter_indexed_documents(args.input_indexed, tok)
    name = args.teacher_name or os.path.basename(os.path.normpath(args.teacher))
    cfg = GenerateConfig(args.output_dir, name, args.input or args.input_indexed, args.batch_size,
                         args.docs_per_shard, args.max_retries, args.max_docs, args.log_interval, filters)
    teacher = build_teacher(args.backend, args.teacher, sampling, args.dtype, args.tensor_parallel_size,
                            args.gpu_memory_utilization, args.max_model_len)
    print(f"teacher {name} on {teacher.backend}", file=sys.stderr)
    with sigterm_as_exit("stopped by signal {signum}; the shard in progress was removed, rerun to resume"):
        report = generate_synthetic_data(documents, PrefixCutter(prefix_cfg, teacher.tokenizer, stats), teacher, cfg)
    print(report.text(), file=sys.stderr)
    return 3 if report.still_failed else 0


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
