"""Adapters under tensor parallelism give the single-process model's logits
and gradients; activation recomputation keeps their gradients; dropout masks
on replicated activations agree across TP ranks.

Every configuration is built by the driver (setup_args, build_model with DDP,
load_checkpoint of the shared base), then every adapter tensor is set from one
full random tensor per global name, sliced to the rank's shard with the
sharding tables (B and DoRA's magnitude too, so no gradient is trivially
zero). Logits come from a forward pass; gradients from megatron-core's
pipeline schedule and finalize_model_grads (DDP main_grad), gathered over TP
into full tensors. The model: TINY_LLAMA (GQA 4 heads / 2 query groups,
SwiGLU, untied), all seven HF modules adapted.
"""

import zlib

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.training.lora_runner import TP2, adapter_argv, lora_flags

# fp32 on CPU: the layouts differ only in how products are split and summed (TP shards,
# all-reduce, reduce-scatter), which moves results by a few ulp (observed < 2e-6 of the
# largest entry); 1e-5 of the largest entry still fails for a misplaced row, a missing
# all-reduce or a dropped gradient term (>1e-2).
TOLERANCE = 1e-5
SEQ, BATCH = 32, 2

METHODS = {
    "lora": lora_flags(),
    "dora_rslora": lora_flags(dora=True, rslora=True),
    "qlora4_dora": lora_flags(dora=True, quant_bits=4),
}
# Dropout on the column-parallel modules only: their input is replicated, so TP=1 and TP=2 draw the same
# masks from the default generator in the same order, and DoRA's dropout path compares across layouts.
COLUMN_DROPOUT = lora_flags(dora=True, dropout=0.3, targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
SP = ["--sequence-parallel"]
FULL_RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
SELECTIVE_RECOMPUTE = ["--recompute-activations"]


def _tokens():
    return torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _global_name(name, offset):
    from megatron.training import sharding

    return next(iter(sharding.to_global_names({name: None}, offset)))


def _adapter_params(args, model):
    """(global name, parameter) of every adapter tensor on this rank."""
    from megatron.core import parallel_state

    from megatron.training import sharding
    from megatron.training.checkpoint.training_state import unwrap
    from megatron.training.peft.targets import is_adapter_key

    offsets = sharding.layer_offsets(args.num_layers, args.pipeline_model_parallel_size,
                                     args.virtual_pipeline_model_parallel_size)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    for v, chunk in enumerate(model):
        for name, param in unwrap(chunk).named_parameters():
            if is_adapter_key(name):
                yield _global_name(name, offsets[(pp_rank, v)]), param


@torch.no_grad()
def _randomise_adapters(args, model):
    from megatron.core import parallel_state

    from megatron.training import sharding

    tp, tp_rank = args.tensor_model_parallel_size, parallel_state.get_tensor_model_parallel_rank()
    for name, param in _adapter_params(args, model):
        part = sharding.tp_partition(name, args.swiglu)
        shape = list(param.shape)
        if part is not None:
            shape[part[0]] *= tp
        full = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        shard = sharding.split_tp(full, part[0], part[1], tp)[tp_rank] if part is not None else full
        if name.endswith("lora_magnitude_vector"):
            param.mul_(1 + 0.2 * shard.abs().clamp(max=1))
        else:
            param.copy_(0.1 * shard)


def _gathered_grads(args, model):
    """{global name: full gradient} after one forward/backward through the schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = _tokens()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)

    def step(data_iterator, chunk):
        losses = chunk(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        return losses, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    for chunk in model:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=model[0],
                                num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
    group = parallel_state.get_tensor_model_parallel_group()
    grads, local = {}, {}
    for name, param in _adapter_params(args, model):
        grad = param.main_grad.detach().clone()
        local[name] = grad
        if getattr(param, "tensor_model_parallel", False) and args.tensor_model_parallel_size > 1:
            pieces = [torch.empty_like(grad) for _ in range(args.tensor_model_parallel_size)]
            torch.distributed.all_gather(pieces, grad, group=group)
            grad = torch.cat(pieces, dim=param.partition_dim)
        grads[name] = grad
    return grads, local


def _run(rank, world_size, configs):
    import pretrain_gpt
    from megatron.core import parallel_state

    from megatron.training import inference, training
    from megatron.training.initialize import destroy

    out = {}
    for name, argv in configs:
        args = training.setup_args(list(argv))
        training.build_tokenizer_from_args(args)
        model = training.build_model(args, pretrain_gpt.model_provider)
        training.load_checkpoint(args, model, None, None)
        _randomise_adapters(args, model)
        logits = inference.forward_logits(args, model, _tokens()[:, :-1])
        grads, local = _gathered_grads(args, model)
        out[name] = {"logits": logits, "grads": grads, "local": local}
        parallel_state.destroy_model_parallel()
    destroy()
    return out


def _argv(base, method, layout=()):
    return adapter_argv(base, METHODS[method], layout=layout, iters=3)


@pytest.fixture(scope="module")
def single(base_checkpoint):
    configs = [(m, _argv(base_checkpoint, m)) for m in METHODS]
    configs += [("column_dropout", adapter_argv(base_checkpoint, COLUMN_DROPOUT, iters=3))]
    configs += [("full_recompute", _argv(base_checkpoint, "dora_rslora", FULL_RECOMPUTE)),
                ("selective_recompute", _argv(base_checkpoint, "dora_rslora", SELECTIVE_RECOMPUTE))]
    return run_distributed(_run, world_size=1, args=(configs,))[0]


@pytest.fixture(scope="module")
def tp2(base_checkpoint):
    configs = [(f"{m}_tp2", _argv(base_checkpoint, m, TP2)) for m in METHODS]
    configs += [(f"{m}_tp2_sp", _argv(base_checkpoint, m, TP2 + SP)) for m in METHODS]
    configs += [("dropout_tp2", adapter_argv(base_checkpoint, lora_flags(dropout=0.3), layout=TP2, iters=3)),
                ("column_dropout_tp2", adapter_argv(base_checkpoint, COLUMN_DROPOUT, layout=TP2, iters=3))]
    return run_distributed(_run, world_size=2, args=(configs,))


def _relative(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def _assert_same(got, want, what):
    assert _relative(got["logits"], want["logits"]) < TOLERANCE, f"{what}: logits differ"
    assert set(got["grads"]) == set(want["grads"]), f"{what}: other adapter tensors"
    for name, grad in want["grads"].items():
        assert grad.abs().max() > 0, f"{what}: {name} has a zero gradient in the reference"
        assert _relative(got["grads"][name], grad) < TOLERANCE, f"{what}: gradient of {name} differs"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_single_process(method, sequence_parallel, single, tp2):
    name = f"{method}_tp2" + ("_sp" if sequence_parallel else "")
    _assert_same(tp2[0][name], single[method], name)
    # Replicated adapter tensors (gathered shape = local shape) hold the same gradient on both TP ranks.
    first, second = tp2[0][name], tp2[1][name]
    replicated = [n for n, g in first["grads"].items() if g.shape == first["local"][n].shape]
    assert replicated
    for param_name in replicated:
        assert torch.equal(first["local"][param_name], second["local"][param_name]), f"{name}: {param_name}"


def test_adapters_cover_every_module_of_every_layer(single):
    names = single["lora"]["grads"]
    # 4 layers x (q, k, v, o, gate, up, down) x (A, B)
    assert len(names) == 4 * 7 * 2
    assert len(single["dora_rslora"]["grads"]) == 4 * 7 * 3


@pytest.mark.parametrize("recompute", ["full_recompute", "selective_recompute"])
def test_activation_recompute_keeps_adapter_gradients(recompute, single):
    """Full recomputation at PP=1 runs layer 0 on the (frozen) embedding output: without making
    that output require grad, its adapters would get no gradient at all."""
    _assert_same(single[recompute], single["dora_rslora"], recompute)
    layer0 = [n for n in single[recompute]["grads"] if n.startswith("decoder.layers.0.")]
    assert layer0 and all(single[recompute]["grads"][n].abs().max() > 0 for n in layer0)


def test_dropout_masks_on_replicated_activations_agree_across_tp_ranks(tp2):
    """Column-parallel lora_A sees the replicated input: its gradient is not reduced over TP,
    so both ranks only hold the same gradient if they drew the same dropout mask."""
    with_dropout = [r["dropout_tp2"]["local"] for r in tp2]
    column_a = [n for n in with_dropout[0] if n.endswith("lora_A.weight") and
                ("linear_qkv" in n or "linear_fc1" in n)]
    assert column_a
    for name in column_a:
        assert torch.equal(with_dropout[0][name], with_dropout[1][name]), f"{name}: dropout masks differ"
        # and dropout was on: the gradient differs from the run without it
        assert not torch.allclose(with_dropout[0][name], tp2[0]["lora_tp2"]["local"][name])


def test_dora_with_dropout_matches_single_process(single, tp2):
    """DoRA with active dropout recomputes W x' on the dropped input (as peft); on the
    column-parallel modules (replicated input, same masks at TP=1 and TP=2) it matches."""
    _assert_same(tp2[0]["column_dropout_tp2"], single["column_dropout"], "column_dropout_tp2")
