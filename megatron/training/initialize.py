"""Process-group set-up: torch.distributed (NCCL with CUDA, gloo without),
megatron-core's parallel_state, and seeds."""

import datetime
import os
import random

import numpy as np
import torch

from megatron.training import cpu_backend


def initialize_distributed(backend: str, timeout_minutes: int = 10) -> None:
    """Join the job's process group (torchrun's environment variables; a
    single process when there are none) and pick this rank's device."""
    cpu_backend.activate()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        # A plain `python pretrain_gpt.py ...`: a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def initialize_model_parallel(args) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
    )


def set_seeds(seed: int) -> None:
    """Same seed on every data-parallel replica; megatron-core's RNG tracker
    derives distinct tensor-parallel streams for dropout from it. Pipeline
    stages are offset so their dropout masks differ, as in Megatron-LM."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
