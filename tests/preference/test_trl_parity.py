"""One DPO step through finetune_dpo.py's providers and the driver's
train_step equals TRL's DPOTrainer on the same tiny model, pairs and beta:
the loss, TRL's reward metrics and every gradient, for sigmoid, ipo and hinge
with a full-model reference (a frozen copy loaded from --ref-load) and for
sigmoid and ipo with adapters (reference = the base with adapters off; TRL
with a peft LoRA adapter, reference = adapter disabled). The per-sequence
log-probs of both sides are also checked against transformers' own logits
(log_softmax, gathered, summed over the response). fp32 on CPU; the only
difference is the order of floating-point reductions (megatron-core's fused
qkv and attention vs transformers' sdpa), so:
  log-probs, loss, metrics: relative 1e-5 (absolute 1e-6 for values near 0);
  gradients: |ours - TRL| <= 1e-4 x max|TRL grad| + 1e-7 per tensor.
"""

import sys

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.preference.conftest import driver_flags

CASES = [("copy", "sigmoid", 0.1), ("copy", "ipo", 0.5), ("copy", "hinge", 0.1),
         ("adapters", "sigmoid", 0.1), ("adapters", "ipo", 0.5)]
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lora-target-modules", "all-linear"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL, ATOL = 1e-5, 1e-6
GRAD_RTOL = 1e-4
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _ours(rank, world_size, tiny, cases):
    """Per case: metrics of one train_step, per-sequence log-probs of the first micro-batch (before the step),
    the gradients (megatron names) and, with adapters, the random adapter weights used."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from megatron.core import parallel_state

    import finetune_dpo
    from megatron.training import training
    from megatron.training.data.preference_dataset import split_pair_batch
    from megatron.training.initialize import destroy
    from megatron.training.preference.arguments import add_preference_args
    from megatron.training.preference.loss import sequence_logps
    from megatron.training.preference.reference import policy_and_reference

    out = {}
    try:
        for mode, loss, beta in cases:
            extra = ["--pref-loss", loss, "--pref-beta", str(beta), "--pref-reference", mode]
            if mode == "copy":
                flags = driver_flags(tiny["policy"], tiny["train"], extra + ["--ref-load", tiny["reference"]])
            else:
                flags = driver_flags(tiny["reference"], tiny["train"], extra + LORA)
            run = finetune_dpo.PreferenceRun()
            args = training.setup_args(flags, add_preference_args)
            tokenizer = training.build_tokenizer_from_args(args)
            model = training.build_model(args, run.model_provider)
            optimizer, scheduler = training.build_optimizer(args, model)
            training.load_checkpoint(args, model, optimizer, scheduler)
            lora = {}
            if mode == "adapters":  # B is 0 at the start (policy = reference): draw both A and B
                g = torch.Generator().manual_seed(7)
                for name, p in model[0].named_parameters():
                    if p.requires_grad:
                        p.data.copy_(0.3 * torch.randn(p.shape, generator=g))
                        lora[name[len("module."):]] = p.detach().clone()
            train, _, _ = training.build_data_iterators(args, tokenizer, run.train_valid_test_datasets_provider, 0)
            batch = next(train)
            tokens, labels, mask, position_ids, _ = split_pair_batch(batch, torch.device("cpu"))
            with torch.no_grad():
                rows = policy_and_reference(model[0], run.reference, tokens, position_ids, labels)
            logps = sequence_logps(rows, torch.cat([mask, mask]))
            step = training._bind_forward_step(run.forward_step, args)
            train_again, _, _ = training.build_data_iterators(args, tokenizer, run.train_valid_test_datasets_provider,
                                                              0)
            losses, _, _ = training.train_step(args, step, train_again, model, optimizer, scheduler)
            grads = {name[len("module."):]: p.main_grad.clone() for name, p in model[0].named_parameters()
                     if p.requires_grad}
            out[(mode, loss)] = {"metrics": {k: float(v) for k, v in losses.items()}, "logps": logps,
                                 "grads": grads, "lora": lora, "tokens": tokens, "mask": mask}
            parallel_state.destroy_model_parallel()
    finally:
        destroy()
    return out


def _pairs(tiny, seq_length, seed, count):
    """The first `count` pairs the training iterator reads: TRL's {prompt_ids, chosen_ids, rejected_ids}."""
    from megatron.training.data.preference_dataset import PreferenceDataset

    ds = PreferenceDataset(tiny["train"], seq_length, shuffle=True, seed=seed)
    pairs = []
    for i in range(count):
        p = ds.pair_index(i)
        sides = [(ds.tokens[2 * p + k].tolist(), ds.masks[2 * p + k].tolist()) for k in (0, 1)]
        start = sides[0][1].index(1)
        assert sides[0][0][:start] == sides[1][0][:start] and sides[1][1].index(1) == start  # one shared prompt
        pairs.append({"prompt_ids": sides[0][0][:start], "chosen_ids": sides[0][0][start:],
                      "rejected_ids": sides[1][0][start:]})
    return pairs


def _hf_logps(model, inputs):
    """Summed response log-probs per row, straight from transformers' logits."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    return (token * inputs["completion_mask"][:, 1:]).sum(-1)


def _trl(tiny, mode, loss, beta, examples, lora, out_dir):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from megatron.training.checkpoint_convert.peft import HF_PATHS

    tok = PreTrainedTokenizerFast.from_pretrained(tiny["tokenizer"])
    load = lambda d: LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)  # noqa: E731
    policy = load(tiny["policy_hf"] if mode == "copy" else tiny["reference_hf"])
    ref = load(tiny["reference_hf"]) if mode == "copy" else None
    adapters = mode == "adapters"
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS) if adapters else None
    config = DPOConfig(output_dir=out_dir, beta=beta, loss_type=[loss], bf16=False, use_cpu=True,
                       report_to="none", max_length=None, per_device_train_batch_size=len(examples), seed=1234)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, peft_config=peft_config, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}]))
    model = trainer.model
    params = dict(model.named_parameters())
    for ours, value in lora.items():  # decoder.layers.<i>.<module>.adapter.<hf module>.lora_A.weight
        parts = ours.split(".")
        layer, hf_module, tensor = parts[2], parts[-3], parts[-2]
        name = f"base_model.model.model.layers.{layer}.{HF_PATHS[hf_module]}.{tensor}.default.weight"
        with torch.no_grad():
            params[name].copy_(value)
    inputs = trainer.data_collator(examples)
    policy_logps = _hf_logps(model, inputs)
    if ref is not None:
        ref_logps = _hf_logps(ref, inputs)
    else:
        with model.disable_adapter():
            ref_logps = _hf_logps(model, inputs)
    model.train()
    value = trainer.compute_loss(model, inputs)
    value.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    metrics["loss"] = float(value)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return metrics, policy_logps, ref_logps, grads


def _cpo(calls):
    """TRL's CPOTrainer.cpo_loss (experimental/cpo) on given per-sequence log-probs: (losses, chosen rewards,
    rejected rewards) per call (loss type, beta, label smoothing, SimPO gamma, chosen, rejected)."""
    import types

    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    out = {}
    for loss_type, beta, smoothing, gamma, chosen, rejected in calls:
        fake = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=smoothing,
                                     simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))
        out[(loss_type, smoothing)] = CPOTrainer.cpo_loss(fake, chosen, rejected)
    return out


def _theirs(rank, world_size, tiny, cases, examples, loras, out_dir, cpo_calls):
    """TRL's side of every case, in a process of its own: TRL imports pyarrow, whose allocator thread would
    make later forks of the test process (multiprocessing pools in other tests) hang."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    out = {(mode, loss): _trl(tiny, mode, loss, beta, examples, loras[(mode, loss)], out_dir)
           for mode, loss, beta in cases}
    out["cpo"] = _cpo(cpo_calls)
    return out


def _hf_grads_of(ours, tiny, vocab_size):
    """Our gradients under HF names: the full model's (qkv / fc1 split, vocabulary padding cut)."""
    from megatron.training.checkpoint_convert.llama import hf_layer
    from megatron.training.models.hf_names import LLAMA_GLOBALS

    args = {"num_attention_heads": 4, "num_query_groups": 2, "hidden_size": 32, "kv_channels": 8}
    out = {hf: ours[mg][:vocab_size] if "embed" in hf or "lm_head" in hf else ours[mg] for mg, hf in LLAMA_GLOBALS}
    for i in range(2):
        out.update(hf_layer({k: v for k, v in ours.items() if k.startswith(f"decoder.layers.{i}.")}, i, args))
    return out


def run_ours(tiny):
    return run_distributed(_ours, 1, args=(tiny, CASES))[0]


def run_theirs(tiny, ours, out_dir, cpo_calls):
    from tests.preference.conftest import SEQ_LENGTH

    loras = {key: value["lora"] for key, value in ours.items()}
    return run_distributed(_theirs, 1, args=(tiny, CASES, _pairs(tiny, SEQ_LENGTH, 1234, 4), loras, out_dir,
                                             cpo_calls))[0]


def _close(got, want, what):
    assert abs(got - want) <= ATOL + RTOL * abs(want), f"{what}: ours {got!r}, reference {want!r}"


@pytest.mark.parametrize("mode,loss,beta", CASES)
def test_one_step_equals_trl(tiny, ours, theirs, mode, loss, beta):
    got = ours[(mode, loss)]
    metrics, policy_logps, ref_logps, trl_grads = theirs[(mode, loss)]

    # log-probs of the first micro-batch (pairs 0 and 1; rows chosen, chosen, rejected, rejected) vs transformers
    hf_rows = torch.cat([policy_logps[[0, 1, 4, 5]], ref_logps[[0, 1, 4, 5]]])
    torch.testing.assert_close(got["logps"], hf_rows, rtol=RTOL, atol=ATOL)
    assert metrics["rewards/margins"] != 0.0  # the policy and the reference differ: a non-trivial comparison

    _close(got["metrics"]["loss"], metrics["loss"], f"{mode} {loss}: loss")
    for key in METRICS:
        _close(got["metrics"][key], metrics[key], f"{mode} {loss}: {key}")

    if mode == "copy":
        ours_grads = _hf_grads_of(got["grads"], tiny, len(tiny["vocab"]))
    else:
        from megatron.training.checkpoint_convert.peft import HF_PATHS

        ours_grads = {}
        for name, g in got["grads"].items():
            parts = name.split(".")
            ours_grads[f"base_model.model.model.layers.{parts[2]}.{HF_PATHS[parts[-3]]}.{parts[-2]}.default.weight"] = g
    assert set(ours_grads) == set(trl_grads)
    for name, want in trl_grads.items():
        bound = GRAD_RTOL * want.abs().max() + 1e-7
        err = (ours_grads[name] - want).abs().max()
        assert err <= bound, f"{mode} {loss}: gradient of {name} differs by {err:.3g} (bound {bound:.3g})"


def test_trl_ran_outside_the_test_process(theirs):
    """TRL imports pyarrow, whose jemalloc thread makes a forked child of this process hang on its first
    allocation (the multiprocessing pools of the data-tool tests that run later): TRL stays in its own process."""
    assert not {"trl", "datasets", "pyarrow"} & set(sys.modules)
