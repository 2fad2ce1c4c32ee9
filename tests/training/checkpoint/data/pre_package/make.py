"""How these checkpoints were made: with the code of commit 79a4618 (before
the checkpoint modules became megatron/training/checkpoint/), from the
repository root: `python tests/training/checkpoint/data/pre_package/make.py OUT`.
A tiny Llama trained 4 iterations, saved at 2 in each format; iteration 4 is
removed and the tracker points at 2. losses.json holds the flags and the
losses of iterations 3-4 of the run that wrote them (the uninterrupted
continuation that a resume must reproduce)."""
import json, os, shutil, sys
sys.path.insert(0, os.getcwd())
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, run_pretrain_sequence

TINY = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--seq-length", "16", "--max-position-embeddings", "16",
        "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "4"]
def main():
    out = sys.argv[1]
    argvs = [TINY + MOCK_DATA + ["--vocab-size", "64"] + SCHEDULE + ["--ckpt-format", fmt, "--save", os.path.join(out, fmt), "--save-interval", "2"]
             for fmt in ("torch", "torch_dist")]
    runs = run_pretrain_sequence(argvs)
    for fmt, losses in zip(("torch", "torch_dist"), runs):
        root = os.path.join(out, fmt)
        shutil.rmtree(os.path.join(root, "iter_0000004"))
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        with open(os.path.join(root, "losses.json"), "w") as f:
            json.dump({"argv": TINY + MOCK_DATA + ["--vocab-size", "64"] + SCHEDULE, "losses_after_resume": [l for it, l, _ in losses if it > 2]}, f, indent=1)
    print(runs)


if __name__ == "__main__":
    main()
