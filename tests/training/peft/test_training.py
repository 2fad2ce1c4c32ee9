"""Adapter training through the driver: every parallel layout trains the same
adapters as one process, the frozen base stays bit-identical, and the
adapter-only checkpoint holds exactly the adapters and names its base.

Each run is pretrain_gpt's own pretrain() call; the test's model provider
keeps a handle on the chunks it built, so the base weights can be read after
training and compared with the base checkpoint.
"""

import os

import pytest
import torch

from megatron.training.peft.checkpoint import merged_adapter_state
from tests.distributed.launcher import run_distributed
from tests.training.lora_runner import TP2_PP2, adapter_argv, lora_flags

# DoRA + RSLoRA on all seven modules: A, B and magnitudes all train.
LORA = lora_flags(dora=True, rslora=True)
LAYOUTS = {
    "tp2_pp2": (4, TP2_PP2),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
    "pp2_interleaved": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
}
# fp32 on CPU, 3 Adam steps: the layouts differ by reduction order only (a few ulp in every
# gradient); Adam divides by sqrt(v), which magnifies that for entries with tiny gradients, so
# the adapters agree to a few 1e-6 of each tensor's largest entry (observed <= 4e-6) and the
# losses to ~1e-7. 1e-4 still fails for a lost gradient or a wrongly sharded update (O(1)).
TOLERANCE = 1e-4
LOSS_RTOL = 1e-5  # as tests/training/test_parity.py


def _train_and_read_base(rank, world_size, argv):
    """pretrain() with a provider that remembers its chunks; returns this rank's
    losses, layout position and base tensors (global layer names) after training."""
    import pretrain_gpt
    from megatron.core import parallel_state

    from megatron.training import sharding
    from megatron.training.initialize import destroy
    from megatron.training.peft.targets import is_adapter_key
    from megatron.training.training import pretrain

    built = []

    def provider(args, config, pre_process=None, post_process=None, vp_stage=None):
        built.append(pretrain_gpt.model_provider(args, config, pre_process, post_process, vp_stage))
        built_args.append(args)
        return built[-1]

    built_args = []
    try:
        state = pretrain(pretrain_gpt.train_valid_test_datasets_provider, provider, pretrain_gpt.forward_step,
                         argv=list(argv))
        args = built_args[0]
        offsets = sharding.layer_offsets(args.num_layers, args.pipeline_model_parallel_size,
                                         args.virtual_pipeline_model_parallel_size)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        base = {}
        for v, chunk in enumerate(built):
            local = {n: t.detach().clone() for n, t in chunk.state_dict().items()
                     if isinstance(t, torch.Tensor) and not is_adapter_key(n)}
            base.update(sharding.to_global_names(local, offsets[(pp_rank, v)]))
        return {"tp": parallel_state.get_tensor_model_parallel_rank(), "pp": pp_rank,
                "dp": parallel_state.get_data_parallel_rank(), "base": base,
                "trainable": sorted(n for c in built for n, p in c.named_parameters() if p.requires_grad),
                "losses": [(h["iteration"], h["lm loss"]) for h in state.history if "lm loss" in h]}
    finally:
        destroy()


def _run(argv, world_size):
    return run_distributed(_train_and_read_base, world_size=world_size, args=(tuple(argv),))


def _merged_base(results, swiglu=True):
    """The base tensors of all ranks, merged over TP, with global names."""
    from megatron.training import sharding

    merged = {}
    for pp in sorted({r["pp"] for r in results}):
        stage = sorted((r for r in results if r["pp"] == pp and r["dp"] == 0), key=lambda r: r["tp"])
        merged.update(sharding.merge_tp_states([r["base"] for r in stage], swiglu))
    return merged


@pytest.fixture(scope="module")
def single(base_checkpoint, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("single") / "adapter")
    results = _run(adapter_argv(base_checkpoint, LORA, save=save), 1)
    return results, save


def _base_file(base_checkpoint):
    return torch.load(os.path.join(base_checkpoint, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"),
                      map_location="cpu", weights_only=True)["model"]


def test_single_process_trains_adapters_only_and_saves_them_alone(single, base_checkpoint):
    results, save = single
    losses = results[0]["losses"]
    assert [it for it, _ in losses] == [1, 2, 3]
    assert all(n.split(".adapter.")[0] != n for n in results[0]["trainable"]), "a base parameter trains"
    assert len(results[0]["trainable"]) == 4 * 7 * 3  # 4 layers x 7 modules x (A, B, magnitude)
    base = _base_file(base_checkpoint)
    after = _merged_base(results)
    assert set(after) >= {n for n in base if not n.endswith("_extra_state")}
    for name, tensor in base.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(after[name], tensor), f"the frozen base changed: {name}"
    state = torch.load(os.path.join(save, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"), map_location="cpu",
                       weights_only=True)
    assert state["adapter_base"] == {"load": os.path.abspath(base_checkpoint), "iteration": 3}
    assert sorted(state["model"]) == results[0]["trainable"]
    assert state["args"]["lora_rank"] == 4 and state["args"]["lora_use_dora"] and state["args"]["lora_use_rslora"]
    assert state["args"]["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_the_same_adapters_and_keeps_the_base(layout, single, base_checkpoint, tmp_path):
    world_size, flags = LAYOUTS[layout]
    save = str(tmp_path / "adapter")
    results = _run(adapter_argv(base_checkpoint, LORA, layout=flags, save=save), world_size)
    reference_results, reference_save = single
    losses = next(r["losses"] for r in results if r["losses"])
    for (it, got), (_, want) in zip(losses, reference_results[0]["losses"]):
        assert got == pytest.approx(want, rel=LOSS_RTOL), f"{layout}: iteration {it} loss"
    base = _base_file(base_checkpoint)
    after = _merged_base(results)
    for name, tensor in base.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(after[name], tensor), f"{layout}: the frozen base changed: {name}"
    _, adapter_base, adapters = merged_adapter_state(save)
    _, _, reference = merged_adapter_state(reference_save)
    assert adapter_base["load"] == os.path.abspath(base_checkpoint)
    assert set(adapters) == set(reference)
    for name, tensor in reference.items():
        assert adapters[name].shape == tensor.shape, name
        scale = tensor.abs().max().clamp(min=1e-12)
        assert ((adapters[name] - tensor).abs().max() / scale).item() < TOLERANCE, f"{layout}: {name}"


def test_tied_embeddings_under_pipeline_parallelism(tmp_path):
    """With tied embeddings and PP=2 the last stage keeps megatron-core's copy of the (frozen)
    word embeddings: both copies stay bit-identical and the adapters train as in one process."""
    from tests.training.lora_runner import make_base

    base = make_base(str(tmp_path / "tied_base"), tied=True, train_iters=3)
    saves = {n: str(tmp_path / n) for n in ("single", "pp2")}
    single = _run(adapter_argv(base, LORA, save=saves["single"], tied=True), 1)
    pp2 = _run(adapter_argv(base, LORA, layout=["--pipeline-model-parallel-size", "2"], save=saves["pp2"], tied=True),
               2)
    first_stage, last_stage = (next(r for r in pp2 if r["pp"] == p) for p in (0, 1))
    assert torch.equal(last_stage["base"]["output_layer.weight"], first_stage["base"]["embedding.word_embeddings.weight"])
    assert torch.equal(first_stage["base"]["embedding.word_embeddings.weight"],
                       _base_file(base)["embedding.word_embeddings.weight"])
    assert [l for _, l in last_stage["losses"]] == pytest.approx([l for _, l in single[0]["losses"]], rel=LOSS_RTOL)
    got, want = merged_adapter_state(saves["pp2"])[2], merged_adapter_state(saves["single"])[2]
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert ((got[name] - tensor).abs().max() / tensor.abs().max()).item() < TOLERANCE, name
