"""The adapter flags: defaults, what a checkpoint records, and one-line errors naming the fix."""

import pytest

from megatron.training import sharding
from megatron.training.arguments import ArgumentError, parse_args, validate_args
from megatron.training.peft.arguments import adapter_flags
from megatron.training.peft.targets import TARGETS, LayerDims, expand_targets, local_row_order

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
        "--num-query-groups", "2", "--swiglu", "--seq-length", "32", "--max-position-embeddings", "32",
        "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "128",
        "--transformer-impl", "local", "--load", "base", "--finetune"]


def check(argv, base=BASE):
    args = parse_args(base + argv)
    validate_args(args, 1)
    return args


def test_defaults_are_finloras_and_switched_on_by_the_rank():
    args = check(["--lora-rank", "8"])
    assert (args.lora_alpha, args.lora_dropout, args.lora_target_modules) == (16.0, 0.05, ["q_proj", "k_proj", "v_proj"])
    assert args.lora_use_dora is False and args.lora_use_rslora is False and args.lora_quant_bits is None
    plain = check([])
    assert plain.lora_rank is None and plain.lora_alpha is None  # no adapters: all weights train


def test_adapters_default_to_the_local_spec_where_transformer_engine_is_installed(monkeypatch):
    """An NGC container has Transformer Engine, whose spec is then the default: with --lora-rank and no
    --transformer-impl the local spec is chosen instead of an error; without adapters TE stays the default."""
    from megatron.training import arguments

    monkeypatch.setattr(arguments, "_transformer_engine_available", lambda: True)
    no_impl = [a for a in BASE if a not in ("--transformer-impl", "local")]
    assert parse_args(no_impl + ["--lora-rank", "8"]).transformer_impl == "local"
    assert parse_args(no_impl).transformer_impl == "transformer_engine"


def test_qlora_without_bitsandbytes_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ArgumentError, match=r"--lora-quant-bits 4 needs bitsandbytes, .*pip install bitsandbytes=="):
        check(["--lora-rank", "4", "--lora-quant-bits", "4"])
    assert check(["--lora-rank", "4"]).lora_quant_bits is None  # plain LoRA does not need it


def test_all_linear_and_names_come_back_in_table_order():
    assert check(["--lora-rank", "4", "--lora-target-modules", "all-linear"]).lora_target_modules == list(TARGETS)
    assert expand_targets(["v_proj", "down_proj", "q_proj"]) == ["q_proj", "v_proj", "down_proj"]


def test_recorded_settings_rebuild_the_same_flags():
    args = check(["--lora-rank", "4", "--lora-alpha", "8", "--lora-use-dora", "--lora-use-rslora",
                  "--lora-quant-bits", "4", "--lora-target-modules", "o_proj", "q_proj"])
    recorded = {k: getattr(args, k) for k in vars(args) if k.startswith("lora_")}
    again = check(adapter_flags(recorded))
    assert {k: getattr(again, k) for k in recorded} == recorded


@pytest.mark.parametrize("argv, base, message", [
    (["--lora-use-dora"], BASE, r"--lora-use-dora configures adapters, which --lora-rank R switches on: add --lora-rank"),
    (["--lora-target-modules", "q_proj"], BASE, r"--lora-target-modules configures adapters"),
    (["--lora-rank", "0"], BASE, r"--lora-rank 0: the adapter rank must be a positive integer"),
    (["--lora-rank", "4", "--lora-target-modules", "q_proj", "qkv_proj"], BASE,
     r"unknown target module\(s\) qkv_proj: choose among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
     r"down_proj or all-linear"),
    (["--lora-rank", "4", "--lora-target-modules", "all-linear", "q_proj"], BASE, r"all-linear already names"),
    (["--lora-rank", "4", "--lora-dropout", "1"], BASE, r"--lora-dropout 1 must be in \[0, 1\)"),
    (["--lora-rank", "4", "--lora-alpha", "0"], BASE, r"--lora-alpha 0 must be positive"),
    (["--lora-rank", "4", "--lora-quant-bits", "3"], BASE, r"invalid choice: 3"),
    (["--lora-rank", "4", "--transformer-impl", "transformer_engine"], BASE,
     r"drop --transformer-impl transformer_engine \(the default with --lora-rank is local"),
    (["--lora-rank", "4", "--lora-target-modules", "up_proj"], [a for a in BASE if a != "--swiglu"],
     r"gate_proj/up_proj need Llama's gated MLP \(--swiglu\)"),
    (["--lora-rank", "4"], BASE[: BASE.index("--load")], r"give the base checkpoint with --load BASE --finetune"),
])
def test_bad_adapter_flags_name_the_fix(argv, base, message):
    with pytest.raises(ArgumentError, match=message) as error:
        check(argv, base)
    assert "\n" not in str(error.value)


def test_sharding_table_splits_each_adapter_tensor_as_its_module_kind():
    """Column-parallel: B and magnitude split on dim 0, A replicated; row-parallel: A split on dim 1."""
    for name, (module, kind) in TARGETS.items():
        prefix = f"decoder.layers.3.{module}.adapter.{name}."
        parts = {t: sharding.tp_partition(prefix + t, gated_mlp=True)
                 for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
        if kind == "column":
            assert parts == {"lora_A.weight": None, "lora_B.weight": (0, 1), "lora_magnitude_vector": (0, 1)}, name
        else:
            assert parts == {"lora_A.weight": (1, 1), "lora_B.weight": None, "lora_magnitude_vector": None}, name


def test_qkv_shard_rows_follow_megatrons_query_groups():
    # 4 heads of 8 in 2 groups: per group [q (2 heads = 16 rows); k (8); v (8)]; HF order q0..q31, k0..k15, v0..v15.
    dims = LayerDims(hidden=32, ffn=64, heads=4, groups=2, head_dim=8, gated=True)
    order = local_row_order("self_attention.linear_qkv", dims, tp=1).tolist()
    assert order[:16] == list(range(0, 16)) and order[16:24] == list(range(32, 40))
    assert order[24:32] == list(range(48, 56)) and order[32:48] == list(range(16, 32))
    assert local_row_order("mlp.linear_fc1", dims, tp=2).tolist() == list(range(64))
