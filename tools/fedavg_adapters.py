"""Average several peft LoRA adapters of one base model and configuration into
one, weighted by each one's number of training examples (FedAvg, as FinLoRA's
federated LoRA with Flower aggregates them).

    python tools/fedavg_adapters.py --adapters bank_a/adapter bank_b/adapter bank_c/adapter \\
        --num-examples 12000 8000 4000 --out global/adapter

Rule: every tensor of adapter_model.safetensors (lora_A, lora_B, and DoRA's
lora_magnitude_vector) is averaged on its own, T = sum_k n_k T_k / sum_k n_k.
Averaging A and B separately is not the average of the updates B @ A (see
megatron/training/checkpoint_convert/fedavg.py). Adapters whose
adapter_config.json differ (base_model_name_or_path, r, lora_alpha,
target_modules, use_dora, ...) or whose tensors differ are refused.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from megatron.training.errors import Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", nargs="+", required=True, help="peft adapter directories (two or more)")
    p.add_argument("--num-examples", nargs="+", type=int, required=True,
                   help="each adapter's number of training examples, in the order of --adapters")
    p.add_argument("--out", required=True, help="the averaged peft directory (must not exist yet, or be empty)")
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.training.checkpoint_convert.core import staged_output
    from megatron.training.checkpoint_convert.fedavg import average_adapters

    with staged_output(args.out) as staging:
        config, shares = average_adapters(args.adapters, args.num_examples, staging)
    for path, n, share in zip(args.adapters, args.num_examples, shares):
        print(f"  {path}: {n} examples, weight {share:.4f}")
    if config.get("base_model_name_or_path") is None:
        print("note: base_model_name_or_path is null in every adapter, so their common base was not checked",
              file=sys.stderr)
    print(f"saved {os.path.abspath(args.out)}: FedAvg of {len(args.adapters)} adapters (each tensor averaged on its "
          "own, weighted by examples)", flush=True)
    return 0


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
