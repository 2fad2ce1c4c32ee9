"""--rotary-seq-len-interpolation-factor reaches the model and divides the rotary positions."""

import sys

import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA


def _rotary_angles(rank, world_size, factor):
    sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training import initialize
    from megatron.training.training import build_model, build_tokenizer_from_args, setup_args

    argv = TINY_LLAMA + MOCK_DATA + SCHEDULE + ["--micro-batch-size", "1", "--train-iters", "3"]
    if factor:
        argv += ["--rotary-seq-len-interpolation-factor", str(factor)]
    try:
        args = setup_args(argv)
        build_tokenizer_from_args(args)
        model = build_model(args, pretrain_gpt.model_provider)
        gpt = model[0].module
        return gpt.rotary_pos_emb(64).reshape(64, -1).clone(), args.kv_channels, args.rotary_base
    finally:
        initialize.destroy()


def test_interpolation_factor_divides_rotary_positions():
    angles, head_dim, base = run_distributed(_rotary_angles, 1, args=(4.0,))[0]
    plain, _, _ = run_distributed(_rotary_angles, 1, args=(None,))[0]
    # Independent reference: RoPE angles are position x inv_freq, positions divided by the factor.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    for positions, got in ((torch.arange(64, dtype=torch.float64) / 4.0, angles),
                           (torch.arange(64, dtype=torch.float64), plain)):
        freqs = torch.outer(positions, inv_freq)
        expected = torch.cat([freqs, freqs], dim=-1).float()  # megatron-core's rotate-half layout
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Position 4k with the factor is exactly position k without it.
    torch.testing.assert_close(angles[8], plain[2], rtol=1e-6, atol=1e-6)
