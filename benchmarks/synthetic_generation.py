"""Generated tokens/s of tools/generate_synthetic_data.py's teacher backends.

    python benchmarks/synthetic_generation.py --out benchmarks/results/synthetic_generation_cpu.md

Random Llama teachers (a byte-level BPE of 1,000 tokens trained on the sample
corpus) continue 32-token prefixes of the sample corpus through the whole
generation loop (prompts, teacher, filters, shards), so the rates include
everything but model loading. The transformers backend runs at several batch
sizes; vLLM runs when it is installed with a GPU.
"""

import argparse
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (hidden, layers, heads, kv heads)
MODELS = {"tiny (0.2M)": (64, 2, 4, 2), "small (25M)": (512, 8, 8, 4)}


def build_teacher_dir(path: str, corpus: str, hidden: int, layers: int, heads: int, kv: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron.training.data.sample_corpus import train_sample_hf_tokenizer

    train_sample_hf_tokenizer(corpus, path, vocab_size=1000)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def measure(teacher, corpus: str, out: str, batch_size: int, docs: int):
    from megatron.training.distill.documents import PrefixConfig, PrefixCutter, SourceStats, iter_jsonl_documents
    from megatron.training.distill.filters import FilterConfig
    from megatron.training.distill.generate import GenerateConfig, generate_synthetic_data

    stats = SourceStats()
    cfg = GenerateConfig(out, "bench", corpus, batch_size=batch_size, docs_per_shard=docs, max_docs=docs,
                         log_interval_s=1e9, filters=FilterConfig(min_tokens=1))
    cutter = PrefixCutter(PrefixConfig("tokens", 32), teacher.tokenizer, stats)
    return generate_synthetic_data(iter_jsonl_documents(corpus, stats), cutter, teacher, cfg, log=lambda m: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "synthetic_generation_cpu.md"))
    p.add_argument("--docs", type=int, default=32, help="documents per measurement")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    args = p.parse_args()
    import torch

    from megatron.training.data.sample_corpus import write_sample_corpus
    from megatron.training.distill.teacher import SamplingConfig, build_teacher, vllm_available

    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="synth_bench_")
    corpus = os.path.join(tmp, "corpus.jsonl")
    write_sample_corpus(corpus)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    backends = ["hf"] + (["vllm"] if vllm_available() else [])
    rows = []
    for name, shape in MODELS.items():
        path = os.path.join(tmp, name.split()[0])
        params = build_teacher_dir(path, corpus, *shape)
        for backend in backends:
            teacher = build_teacher(backend, path, sampling)
            for bs in args.batch_sizes if backend == "hf" else [args.docs]:
                measure(teacher, corpus, os.path.join(tmp, f"warm-{name}-{backend}-{bs}"), bs, bs)  # warm-up
                r = measure(teacher, corpus, os.path.join(tmp, f"{name}-{backend}-{bs}"), bs, args.docs)
                docs_s, tok_s = r.rates()
                rows.append((name, params, backend, bs, r.handled, r.generated_tokens, r.elapsed_s, docs_s, tok_s))
                print(rows[-1], file=sys.stderr, flush=True)
            del teacher

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{os.cpu_count()}-core CPU ({platform.machine()}, {platform.processor() or 'unknown'})"
    lines = [
        "# Synthetic-data generation throughput (tools/generate_synthetic_data.py)", "",
        f"Machine: {device}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}; load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} "
        "after the run (other jobs share the machine). Command: `python benchmarks/synthetic_generation.py`.", "",
        f"Random Llama teachers, vocabulary 1,000; {args.docs} documents, 32-token prefixes, up to "
        f"{args.max_new_tokens} new tokens sampled at temperature 1; rates over the whole loop after a warm-up, "
        "without model loading.", "",
        "| teacher | parameters | backend | batch | documents | generated tokens | s | docs/s | generated tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, params, backend, bs, docs, toks, el, docs_s, tok_s in rows:
        lines.append(f"| {name} | {params:,} | {backend} | {bs} | {docs} | {toks:,} | {el:.1f} | {docs_s:.2f} | "
                     f"{tok_s:,.0f} |")
    if "vllm" not in backends:
        lines += ["", "vLLM: not measured (not installed here, and no GPU); run this script on a GPU machine "
                      "with vLLM installed to add its rows."]
    from bench_report import emit

    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
