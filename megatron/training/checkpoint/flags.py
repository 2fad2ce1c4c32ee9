"""The checkpoint package's own flags, under Megatron-LM's names, and their
checks (`--save`, `--load`, `--ckpt-format` and the other basic checkpoint
flags are with the driver's flags in arguments.py). Imports nothing above it:
arguments.py composes these groups.
"""

import torch

from megatron.training.errors import ArgumentError
from megatron.training.peft.arguments import adapters_enabled


def add_dist_ckpt_flags(parser) -> None:
    g = parser.add_argument_group("distributed checkpoints (--ckpt-format torch_dist)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in background processes; training continues once the state is staged")
    g.add_argument("--use-persistent-ckpt-worker", action="store_true",
                   help="with --async-save on GPUs: one long-lived writer process instead of one per save")
    g.add_argument("--no-ckpt-fully-parallel-save", action="store_false", dest="ckpt_fully_parallel_save",
                   help="let the first data-parallel replica write everything (default: replicas share the writing)")
    g.add_argument("--ckpt-fully-parallel-save", action="store_true", dest="ckpt_fully_parallel_save",
                   help="the default; accepted for scripts that pass it")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="data-parallel replicas each read a part of the checkpoint and exchange it")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true", default=True,
                   help="the default: the distributed optimizer's state is stored per parameter, so it loads "
                        "under another TP / PP / DP layout")
    g.add_argument("--no-dist-ckpt-optim-fully-reshardable", action="store_false",
                   dest="dist_ckpt_optim_fully_reshardable",
                   help="store the distributed optimizer's buffers as they are: faster saves, but the optimizer "
                        "state then loads only under the same TP and PP")
    g.add_argument("--distrib-optim-fully-reshardable-mem-efficient", action="store_true",
                   help="gather the distributed optimizer's state on one data-parallel rank only (less memory, "
                        "slower save)")
    g.add_argument("--auto-detect-ckpt-format", action="store_true",
                   help="accepted for scripts that pass it: --load always detects the format")
    parser.set_defaults(ckpt_fully_parallel_save=True)


def add_checkpoint_integrity_args(parser) -> None:
    g = parser.add_argument_group("checkpoint integrity")
    g.add_argument("--ckpt-checksum", action="store_true",
                   help="write the SHA-256 of every checkpoint file (`sha256sum -c` format: checksums.sha256 in each "
                        "rank directory of the torch format, in the iteration directory of torch_dist); torch-format "
                        "files that have them are verified whenever they are loaded, torch_dist checkpoints when "
                        "--ckpt-checksum is given at load too (one more read of every file)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration of --load instead of the one its tracker file names")


def validate_dist_ckpt_args(args) -> None:
    """Resolve the default --ckpt-format; raise ArgumentError for flag
    combinations that cannot work."""
    adapters = adapters_enabled(args)
    if args.ckpt_format is None:
        # Adapter checkpoints (adapter tensors only, naming their base) exist in the torch format only.
        args.ckpt_format = "torch" if adapters else "torch_dist"
    if adapters and args.ckpt_format == "torch_dist":
        raise ArgumentError("--ckpt-format torch_dist cannot hold adapter checkpoints (--lora-rank): they are "
                            "saved in the torch format; drop --ckpt-format torch_dist (the base may be either)")
    if args.async_save and args.ckpt_format != "torch_dist":
        raise ArgumentError(f"--async-save needs --ckpt-format torch_dist (--ckpt-format {args.ckpt_format} is "
                            "written synchronously): drop --async-save or use --ckpt-format torch_dist")
    if args.use_persistent_ckpt_worker and not torch.cuda.is_available():
        raise ArgumentError("--use-persistent-ckpt-worker needs CUDA (megatron-core's persistent writer selects a "
                            "GPU): drop it; --async-save alone starts one writer process per save")
