"""Benchmark tools/checkpoint/util.py on a randomly initialised ~1.1B Llama.

    python benchmarks/checkpoint_conversion.py --out benchmarks/results/checkpoint_conversion_cpu.md

The HF model has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads in
4 query groups, FFN 5632, vocabulary 32000, untied, bf16) with random weights,
written as 1 GB safetensors shards without building the model. Then:
HF -> Megatron TP2 x PP2, and that checkpoint -> HF (1 GB shards), each in its
own process, measuring wall time and the process's peak RSS (VmHWM),
beside the on-disk sizes, the largest output file and one layer's size. The
baseline is the peak RSS of a process that imports the same modules and
converts nothing.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = dict(hidden=2048, layers=22, heads=32, groups=4, ffn=5632, vocab=32000)
GB = 10 ** 9


def write_random_hf(path: str, seed: int = 0) -> None:
    """A random bf16 Llama as HF safetensors shards + index + config, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    h, d = SHAPE["hidden"], SHAPE["hidden"] // SHAPE["heads"]
    kv = SHAPE["groups"] * d
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(SHAPE["vocab"], h)
        for i in range(SHAPE["layers"]):
            p = f"model.layers.{i}."
            for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                                ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                                ("mlp.gate_proj", (SHAPE["ffn"], h)), ("mlp.up_proj", (SHAPE["ffn"], h)),
                                ("mlp.down_proj", (h, SHAPE["ffn"]))):
                yield p + name + ".weight", rand(*shape)
            yield p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "lm_head.weight", rand(SHAPE["vocab"], h)

    os.makedirs(path)
    shards, current, size, total = [], {}, 0, 0
    for name, t in tensors():
        if current and size + t.numel() * 2 > GB:
            shards.append(current)
            save_file(current, os.path.join(path, f"part{len(shards)}"), metadata={"format": "pt"})
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    shards.append(current)
    save_file(current, os.path.join(path, f"part{len(shards)}"), metadata={"format": "pt"})
    weight_map = {}
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(path, f"part{i + 1}"), os.path.join(path, final))
        weight_map.update((n, final) for n in shard)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": SHAPE["vocab"],
              "hidden_size": h, "intermediate_size": SHAPE["ffn"], "num_hidden_layers": SHAPE["layers"],
              "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["groups"], "head_dim": d,
              "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def child(argv) -> None:
    """Run one conversion (or, with no arguments, only the imports) and print the peak RSS."""
    from tools.checkpoint import util
    from megatron.training.checkpoint_convert import hf_files, llama, megatron_format  # noqa: F401

    if argv:
        assert util.main(argv) == 0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_bytes": peak_kb * 1024}))


def run_child(argv):
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], capture_output=True,
                         text=True, check=True)
    return time.time() - t0, json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def disk(path: str):
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    sizes = [os.path.getsize(f) for f in files]
    return sum(sizes), max(sizes)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_conversion_cpu.md"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM")
    args = p.parse_args()
    work = tempfile.mkdtemp(dir=args.workdir, prefix="ckpt-bench-")
    try:
        hf, mg, back = (os.path.join(work, n) for n in ("hf", "mg", "hf_back"))
        t0 = time.time()
        write_random_hf(hf)
        print(f"random HF model written in {time.time() - t0:.0f} s", flush=True)
        base = run_child([])[1]
        common = ["--model-type", "GPT"]
        runs = [
            ("HF -> Megatron TP2 x PP2", hf, mg, common + ["--loader", "llama2_hf", "--saver", "megatron",
                                                        "--load-dir", hf, "--save-dir", mg,
                                                        "--target-tensor-parallel-size", "2",
                                                        "--target-pipeline-parallel-size", "2"]),
            ("Megatron TP2 x PP2 -> HF", mg, back, common + ["--loader", "megatron", "--saver", "hf", "--load-dir",
                                                          mg, "--save-dir", back, "--max-shard-size", "1GB"]),
        ]
        layer_bytes = 2 * (2 * SHAPE["hidden"] ** 2 + 2 * SHAPE["groups"] * SHAPE["hidden"] ** 2 // SHAPE["heads"]
                           + 3 * SHAPE["hidden"] * SHAPE["ffn"])
        n_params = (2 * SHAPE["vocab"] * SHAPE["hidden"] + SHAPE["layers"] * layer_bytes // 2)
        rows = []
        for label, src, dst, argv in runs:
            seconds, rss = run_child(argv)
            total, largest = disk(dst)
            goal = 1.5 * (largest + layer_bytes)
            rows.append(f"| {label} | {seconds:.0f} | {rss / 2 ** 30:.2f} | {(rss - base) / 2 ** 30:.2f} | "
                        f"{disk(src)[0] / 2 ** 30:.2f} | {total / 2 ** 30:.2f} | {largest / 2 ** 30:.2f} | "
                        f"{goal / 2 ** 30:.2f} | {'yes' if rss - base < goal else 'no'} |")
            print(rows[-1], flush=True)
        same = subprocess.run([sys.executable, "-c", (
            "import sys, torch; sys.path.insert(0, %r)\n"
            "from safetensors import safe_open\n"
            "from megatron.training.checkpoint_convert.hf_files import HFWeights\n"
            "a, b = HFWeights(%r), HFWeights(%r)\n"
            "print(all(torch.equal(a.read([n])[n], b.read([n])[n]) for n in a.file_of))") % (ROOT, hf, back)],
            capture_output=True, text=True, check=True).stdout.strip()
        report = [
            "# Checkpoint conversion on CPU (tools/checkpoint/util.py)", "",
            f"Machine: {args.machine} ({platform.processor() or platform.machine()}), shared with other jobs; "
            f"Python {platform.python_version()}. Command: `python benchmarks/checkpoint_conversion.py`.", "",
            f"Model: random Llama of TinyLlama-1.1B's shape ({n_params / 1e9:.2f}B parameters, bf16, GQA 32 heads / "
            f"4 groups, untied, 22 layers), HF input in 1 GB safetensors shards. One layer = "
            f"{layer_bytes / 2 ** 20:.0f} MiB. Baseline RSS (imports only): {base / 2 ** 30:.2f} GiB.", "",
            "| conversion | wall s | peak RSS GiB | peak RSS above baseline GiB | input on disk GiB | "
            "output on disk GiB | largest output file GiB | goal: 1.5 x (largest file + one layer) GiB | "
            "under goal |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows, "",
            f"HF -> Megatron -> HF round trip bitwise identical: {same}.", "",
            "Peak memory follows the largest output file (one TP x PP rank file, or one safetensors shard) "
            "plus one layer, not the model: the whole model is "
            f"{n_params * 2 / 2 ** 30:.2f} GiB.",
        ]
        from bench_report import emit

        emit("\n".join(report) + "\n", args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
