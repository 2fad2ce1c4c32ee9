"""Named fine-tuning configurations (like FinLoRA's finetune_configs.json) ->
the commands that run them: preprocess -> convert -> train -> export.

    {"sentiment_llama_7b": {"base_model": "Llama-2-7b-hf", "dataset_path": "data/train/sentiment_train.jsonl",
                            "learning_rate": 1e-5, "num_epochs": 2, "batch_size": 4,
                            "gradient_accumulation_steps": 2, "layout": {"tensor_parallel": 2, "data_parallel": 4}}}

Relative paths are relative to the JSON file's folder. Each step is skipped
when its output exists (a run interrupted during training resumes from its
own checkpoint). FIELDS lists every key with its default and meaning.
"""

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron.training.errors import UserError
from megatron.training.fileio import atomic_write_text

REQUIRED = object()

FIELDS = {
    "base_model": (REQUIRED, "Megatron checkpoint directory, or Hugging Face model directory (config.json: Llama, "
                             "Mistral, Qwen2, Qwen3): converted once into {save_dir}/base"),
    "dataset_path": (REQUIRED, "training jsonl (file, folder or glob), preprocessed once into "
                               "{save_dir}/data/train; or the prefix of already preprocessed data"),
    "valid_dataset_path": (None, "held-out jsonl or prefix: validation loss over all of it, once per epoch"),
    "save_dir": (None, "outputs (data, base, checkpoints, hf); default finetune_output/<config name>"),
    "format": ("auto", "record format: auto, panda, alpaca, chat (megatron/training/data/sft_formats.py)"),
    "chat_template": ("auto", "auto, tokenizer, raw, alpaca, chatml (megatron/training/data/sft_templates.py)"),
    "tokenizer_type": (None, "default: HuggingFaceTokenizer for an HF base model, else the checkpoint's"),
    "tokenizer_model": (None, "default: the HF base model's folder, else the checkpoint's"),
    "learning_rate": (1e-5, "peak learning rate (--lr)"),
    "min_lr": (0.0, "--min-lr"),
    "lr_decay_style": ("cosine", "--lr-decay-style: constant, linear, cosine"),
    "warmup_ratio": (0.0, "share of the steps spent warming up (--lr-warmup-fraction)"),
    "weight_decay": (0.0, "--weight-decay"),
    "optimizer": ("adam", "adam or sgd"),
    "sgd_momentum": (0.9, "momentum with optimizer sgd"),
    "num_epochs": (1, "passes over the training data (may be fractional)"),
    "batch_size": (1, "micro batch per data-parallel rank (--micro-batch-size)"),
    "gradient_accumulation_steps": (1, "micro batches per step: global batch = batch_size x this x data_parallel"),
    "seq_length": (2048, "tokens per sample (--seq-length)"),
    "packing": (False, "pack several examples per sample (--sft-packing)"),
    "truncation": ("truncate", "over-long examples: truncate or drop (--sft-truncation)"),
    "layout": ({}, "{tensor_parallel, pipeline_parallel, data_parallel}: processes = their product"),
    "bf16": (False, "bf16 weights and compute (--bf16)"),
    "dropout": (0.0, "attention and hidden dropout"),
    "seed": (1234, "--seed (also the data order)"),
    "log_interval": (10, "--log-interval"),
    "save_interval": (None, "iterations between checkpoints; default: only at the end"),
    "export_hf": (True, "export the result as a Hugging Face directory {save_dir}/hf (with adapters: merged)"),
    "eval_accuracy": (False, "after training, greedy answers to valid_dataset_path's records vs their targets: exact "
                             "match, written to {save_dir}/accuracy.json (megatron/training/finetune_accuracy.py)"),
    "workers": (1, "preprocessing processes"),
    "extra_args": ([], "further driver flags, passed as they are"),
    # FinLoRA's adapter keys: with lora_r the base stays frozen and adapters are trained,
    # saved as adapter-only checkpoints and exported as a peft directory {save_dir}/adapter.
    "lora_r": (None, "LoRA rank (--lora-rank): train adapters instead of all weights"),
    "lora_alpha": (16, "--lora-alpha: adapters are scaled by alpha / r (alpha / sqrt(r) with RSLoRA)"),
    "lora_dropout": (0.05, "--lora-dropout on the adapters' input"),
    "lora_target_modules": (["q_proj", "k_proj", "v_proj"],
                            "HF module names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or "
                            "\"all-linear\" (--lora-target-modules)"),
    "quant_bits": (None, "QLoRA: 4 (NF4) or 8 (int8) bits for the frozen base while training (--lora-quant-bits); "
                         "absent or 16: not quantized"),
    "peft_use_dora": (False, "DoRA: magnitude and direction (--lora-use-dora)"),
    "peft_use_rslora": (False, "RSLoRA: scale alpha / sqrt(r) (--lora-use-rslora)"),
    # LLaMA-Factory's preference keys: stage dpo trains on {prompt, chosen, rejected} pairs with finetune_dpo.py.
    "stage": ("sft", "sft (finetune_gpt.py) or dpo: preference tuning on chosen/rejected pairs (finetune_dpo.py)"),
    "pref_loss": ("sigmoid", "dpo: sigmoid (DPO), hinge, ipo or simpo (--pref-loss)"),
    "pref_beta": (0.1, "dpo: beta (--pref-beta)"),
    "pref_ftx": (0.0, "dpo: weight of an SFT term on the chosen responses (--pref-ftx)"),
    "dpo_label_smoothing": (0.0, "dpo: conservative DPO / SimPO label smoothing (--dpo-label-smoothing)"),
    "simpo_gamma": (0.5, "dpo: SimPO's target margin (--simpo-gamma)"),
    "pref_reference": ("auto", "dpo: the reference model: auto (adapters off with lora_r, else a frozen copy of the "
                               "base), copy, or precomputed log-probs stored beside the data (--pref-reference)"),
    "pref_truncation": ("refuse", "dpo: pairs longer than seq_length: refuse (one line naming the record), "
                                  "keep_start or keep_end (TRL's truncation; --truncation-mode of the preprocessing)"),
}
LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "data_parallel")
# The adapter keys that mean nothing without lora_r.
ADAPTER_KEYS = ("lora_alpha", "lora_dropout", "lora_target_modules", "quant_bits", "peft_use_dora", "peft_use_rslora")
QUANT_BITS = {None: None, 16: None, 4: 4, 8: 8}  # quant_bits -> --lora-quant-bits
STAGES = ("sft", "dpo")
# The preference keys (stage dpo) -> their driver flags.
PREFERENCE_FLAGS = {"pref_loss": "--pref-loss", "pref_beta": "--pref-beta", "pref_ftx": "--pref-ftx",
                    "dpo_label_smoothing": "--dpo-label-smoothing", "simpo_gamma": "--simpo-gamma",
                    "pref_reference": "--pref-reference"}
# The keys that mean nothing without stage dpo: the driver's and the preprocessing's.
PREFERENCE_KEYS = (*PREFERENCE_FLAGS, "pref_truncation")
# What each stage's preprocessed data is called ({prefix}<suffix>.idx) and which script trains on it.
REFERENCE_FREE = ("simpo",)  # preference losses without a reference model
STAGE_DATA_SUFFIX = {"sft": "_text_document", "dpo": "_pair_text_document"}
STAGE_SCRIPT = {"sft": "finetune_gpt.py", "dpo": "finetune_dpo.py"}
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")  # the driver's --lr-decay-style


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _integer(low: int):
    return lambda v: _is_int(v) and v >= low, f"an integer >= {low}"


def _number(low: float, high: Optional[float] = None, low_open: bool = False, high_open: bool = True):
    def test(v):
        return _is_number(v) and (v > low if low_open else v >= low) and (
            high is None or (v < high if high_open else v <= high))
    if high is None:
        return test, f"a number {'>' if low_open else '>='} {low}"
    return test, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _one_of(*choices):
    return lambda v: isinstance(v, str) and v in choices, f"{', '.join(choices[:-1])} or {choices[-1]}"


def _or_null(check):
    test, what = check
    return lambda v: v is None or test(v), f"{what}, or null"


_TEXT = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")


def _sft_choices():
    from megatron.training.data.sft_formats import SFT_FORMATS
    from megatron.training.data.sft_templates import CHAT_TEMPLATE_CHOICES

    return SFT_FORMATS, CHAT_TEMPLATE_CHOICES


def _preference_choices():
    from megatron.training.preference.arguments import REFERENCE_MODES
    from megatron.training.preference.loss import LOSSES

    return LOSSES, REFERENCE_MODES


# What each key's value must be: (test, description). Nothing is converted: a quoted number, 4.7 where an
# integer is due or -1 epochs is named with the key, not guessed at (json.load gives str, int, float, bool,
# None, list, dict). The FinLoRA adapter keys' names and ranges follow FinLoRA's finetune_configs.json.
VALUES = {
    "base_model": _TEXT, "dataset_path": _TEXT, "valid_dataset_path": _or_null(_TEXT), "save_dir": _or_null(_TEXT),
    "format": (lambda v: isinstance(v, str) and v in _sft_choices()[0], "a record format: auto, panda, alpaca, chat"),
    "chat_template": (lambda v: isinstance(v, str) and v in _sft_choices()[1],
                      "a chat template: auto, tokenizer, raw, alpaca, chatml"),
    "tokenizer_type": _or_null(_TEXT), "tokenizer_model": _or_null(_TEXT),
    "learning_rate": _number(0, low_open=True), "min_lr": _number(0), "lr_decay_style": _one_of(*LR_DECAY_STYLES),
    "warmup_ratio": _number(0, 1, high_open=False), "weight_decay": _number(0), "optimizer": _one_of("adam", "sgd"),
    "sgd_momentum": _number(0, 1), "num_epochs": _number(0, low_open=True), "batch_size": _integer(1),
    "gradient_accumulation_steps": _integer(1), "seq_length": _integer(1), "packing": _BOOL,
    "truncation": _one_of("truncate", "drop"),
    "layout": (lambda v: isinstance(v, dict) and all(_is_int(n) and n >= 1 for n in v.values()),
               "an object of tensor_parallel, pipeline_parallel, data_parallel sizes (integers >= 1)"),
    "bf16": _BOOL, "dropout": _number(0, 1), "seed": _integer(0), "log_interval": _integer(1),
    "save_interval": _or_null(_integer(1)), "export_hf": _BOOL, "eval_accuracy": _BOOL, "workers": _integer(1),
    "extra_args": (lambda v: isinstance(v, list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                         for a in v), "a list of driver flags and values (strings)"),
    "lora_r": _or_null((lambda v: _is_int(v) and v >= 1, "a positive integer (the adapter rank, e.g. 8)")),
    "lora_alpha": _number(0, low_open=True),
    "lora_dropout": _number(0, 1),
    "lora_target_modules": (lambda v: isinstance(v, str) or (isinstance(v, list) and v and all(
        isinstance(t, str) for t in v)), "a list of HF module names, or \"all-linear\""),
    "quant_bits": (lambda v: v is None or (_is_int(v) and v in QUANT_BITS),
                   "4 (QLoRA, NF4) or 8, or 16 / absent for an unquantized base"),
    "peft_use_dora": _BOOL, "peft_use_rslora": _BOOL,
    "stage": _one_of(*STAGES),
    "pref_loss": (lambda v: isinstance(v, str) and v in _preference_choices()[0], "sigmoid, hinge, ipo or simpo"),
    "pref_beta": _number(0, low_open=True), "pref_ftx": _number(0), "dpo_label_smoothing": _number(0, 0.5),
    "simpo_gamma": _number(0),
    "pref_reference": (lambda v: isinstance(v, str) and v in _preference_choices()[1],
                       "auto, adapters, copy or precomputed"),
    "pref_truncation": _one_of("refuse", "keep_start", "keep_end"),
}
assert set(VALUES) == set(FIELDS), "every key has its check"


def _as_written(value) -> str:
    text = json.dumps(value)
    if isinstance(value, str):
        try:
            float(value)
            return f"{text} (a string: write the number without quotes)"
        except ValueError:
            pass
    return text


class ConfigError(UserError, ValueError):
    pass


TRACKER = "latest_checkpointed_iteration.txt"  # checkpoint/iterations.py TRACKER_FILENAME, without importing torch
FINISHED = "finished.json"  # {save_dir}/finished.json: the configuration whose training ran to its end


def load_config(path: str, name: str) -> dict:
    """The named entry with defaults filled in and paths made absolute."""
    try:
        with open(path, encoding="utf-8") as f:
            configs = json.load(f)
    except OSError as e:
        raise ConfigError(f"--configs {path}: {e.strerror}: give the JSON file of named configurations")
    except ValueError as e:
        raise ConfigError(f"--configs {path} is not valid JSON ({e}): fix the file")
    if not isinstance(configs, dict):
        raise ConfigError(f"--configs {path} holds a JSON {type(configs).__name__}: it must be an object of named "
                          "configurations ({\"NAME\": {\"base_model\": ..., ...}})")
    if name not in configs:
        close = difflib.get_close_matches(name, list(configs), n=3)
        raise ConfigError(f"no configuration {name!r} in {path}" + (f"; did you mean {', '.join(close)}?" if close
                                                                     else f"; it has {', '.join(configs)}"))
    entry = configs[name]
    if not isinstance(entry, dict):
        raise ConfigError(f"{name} in {path} is a JSON {type(entry).__name__}: it must be an object of keys "
                          f"({', '.join(list(FIELDS)[:3])}, ...)")
    for key in entry:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=2)
            raise ConfigError(f"{name}: unknown key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else
                              f"; known keys: {', '.join(FIELDS)}"))
    cfg = {}
    for key, (default, _) in FIELDS.items():
        if key not in entry and default is REQUIRED:
            raise ConfigError(f"{name}: {key!r} is required ({FIELDS[key][1]})")
        cfg[key] = entry.get(key, default)
    bad_layout = set(cfg["layout"]) - set(LAYOUT_KEYS) if isinstance(cfg["layout"], dict) else ()
    if bad_layout:
        raise ConfigError(f"{name}: layout keys are {', '.join(LAYOUT_KEYS)}, not {', '.join(sorted(bad_layout))}")
    for key, value in entry.items():
        valid, what = VALUES[key]
        if not valid(value):
            raise ConfigError(f"{name}: {key} must be {what}, not {_as_written(value)} (in {path})")
    _check_adapter_keys(name, entry, cfg)
    _check_stage_keys(name, entry, cfg)
    base = os.path.dirname(os.path.abspath(path))
    for key in ("base_model", "dataset_path", "valid_dataset_path", "save_dir", "tokenizer_model"):
        if cfg[key] is not None:
            cfg[key] = os.path.normpath(os.path.join(base, cfg[key]))
    cfg["save_dir"] = cfg["save_dir"] or os.path.join(base, "finetune_output", name)
    return cfg


def _check_adapter_keys(name: str, entry: dict, cfg: dict) -> None:
    from megatron.training.checkpoint_convert.core import ConversionError
    from megatron.training.checkpoint_convert.peft import canonical_targets

    if cfg["lora_r"] is None:
        given = [k for k in ADAPTER_KEYS if k in entry]
        if given:
            raise ConfigError(f"{name}: {given[0]!r} configures LoRA adapters: set lora_r (e.g. 8) to train "
                              "adapters, or remove the key to fine-tune all weights")
        return
    try:
        canonical_targets(cfg["lora_target_modules"], f"{name}: lora_target_modules")
    except ConversionError as e:
        raise ConfigError(str(e))


def _check_stage_keys(name: str, entry: dict, cfg: dict) -> None:
    if cfg["stage"] != "dpo":  # (its value is checked with the others, VALUES)
        given = [k for k in PREFERENCE_KEYS if k in entry]
        if given:
            raise ConfigError(f"{name}: {given[0]!r} configures preference tuning: add \"stage\": \"dpo\" (and "
                              "chosen/rejected records), or remove the key")
        return
    if cfg["packing"]:
        raise ConfigError(f"{name}: packing applies to SFT; stage dpo keeps one pair per sample: remove \"packing\"")


def preference_flags(cfg: dict) -> List[str]:
    """The driver's --pref-* flags of a stage dpo configuration (none for SFT)."""
    if cfg["stage"] != "dpo":
        return []
    return [a for key, flag in PREFERENCE_FLAGS.items() for a in (flag, str(cfg[key]))]


def adapter_flags(cfg: dict) -> List[str]:
    """The driver's --lora-* flags of a configuration (none without lora_r)."""
    if cfg["lora_r"] is None:
        return []
    targets = cfg["lora_target_modules"]
    flags = ["--lora-rank", str(cfg["lora_r"]), "--lora-alpha", str(cfg["lora_alpha"]),
             "--lora-dropout", str(cfg["lora_dropout"]),
             "--lora-target-modules", *([targets] if isinstance(targets, str) else targets)]
    if QUANT_BITS[cfg["quant_bits"]]:
        flags += ["--lora-quant-bits", str(QUANT_BITS[cfg["quant_bits"]])]
    return flags + (["--lora-use-dora"] if cfg["peft_use_dora"] else []) + (
        ["--lora-use-rslora"] if cfg["peft_use_rslora"] else [])


@dataclass
class Plan:
    """What to run, in order; paths under save_dir."""

    cfg: dict
    world_size: int
    global_batch_size: int
    base_is_hf: bool
    tokenizer: List[str]  # driver flags naming the tokenizer
    data: Dict[str, str] = field(default_factory=dict)  # split -> preprocessed prefix
    to_preprocess: Dict[str, str] = field(default_factory=dict)  # split -> jsonl input

    @property
    def base_checkpoint(self) -> str:
        return os.path.join(self.cfg["save_dir"], "base") if self.base_is_hf else self.cfg["base_model"]

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.cfg["save_dir"], "checkpoints")


def make_plan(cfg: dict) -> Plan:
    layout = {k: int(cfg["layout"].get(k, 1)) for k in LAYOUT_KEYS}
    world = layout["tensor_parallel"] * layout["pipeline_parallel"] * layout["data_parallel"]
    gbs = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * layout["data_parallel"]
    base_is_hf = os.path.isfile(os.path.join(cfg["base_model"], "config.json"))
    if not base_is_hf and not os.path.isdir(cfg["base_model"]):
        raise ConfigError(f"base_model {cfg['base_model']} does not exist: give a Megatron checkpoint directory "
                          "or a Hugging Face model directory")
    plan = Plan(cfg, world, gbs, base_is_hf, _tokenizer_flags(cfg, base_is_hf))
    for split, key in (("train", "dataset_path"), ("valid", "valid_dataset_path")):
        src = cfg[key]
        if src is None:
            continue
        suffix = STAGE_DATA_SUFFIX[cfg["stage"]]
        if os.path.exists(src + suffix + ".idx"):
            plan.data[split] = src  # already preprocessed
        else:
            plan.data[split] = os.path.join(cfg["save_dir"], "data", split)
            if not os.path.exists(plan.data[split] + suffix + ".idx"):
                plan.to_preprocess[split] = src
    return plan


def _tokenizer_flags(cfg: dict, base_is_hf: bool) -> List[str]:
    kind, model = cfg["tokenizer_type"], cfg["tokenizer_model"]
    if base_is_hf:
        kind, model = kind or "HuggingFaceTokenizer", model or cfg["base_model"]
    elif kind is None:
        from megatron.training.checkpoint.iterations import read_checkpoint_args

        saved = read_checkpoint_args(cfg["base_model"])
        kind, model = saved.get("tokenizer_type"), model or saved.get("tokenizer_model")
    if kind is None:
        raise ConfigError("the base checkpoint records no tokenizer: set tokenizer_type and tokenizer_model")
    return ["--tokenizer-type", kind] + (["--tokenizer-model", model] if model else [])


def preprocess_config(plan: Plan, split: str):
    tok = dict(zip(plan.tokenizer[::2], plan.tokenizer[1::2]))
    common = dict(input=plan.to_preprocess[split], output_prefix=plan.data[split],
                  tokenizer_type=tok["--tokenizer-type"], tokenizer_model=tok.get("--tokenizer-model"),
                  chat_template=plan.cfg["chat_template"], workers=plan.cfg["workers"])
    if plan.cfg["stage"] == "dpo":  # pairs longer than the sequence are refused here (or truncated, if asked)
        from megatron.training.data.preference_preprocess import PreferencePreprocessConfig

        mode = plan.cfg["pref_truncation"]
        return PreferencePreprocessConfig(seq_length=plan.cfg["seq_length"],
                                          truncation_mode=None if mode == "refuse" else mode, **common)
    from megatron.training.data.sft_preprocess import SFTPreprocessConfig

    return SFTPreprocessConfig(sft_format=plan.cfg["format"], **common)


def preprocess(plan: Plan, split: str) -> str:
    """Preprocess one split of the plan; the report's text."""
    if plan.cfg["stage"] == "dpo":
        from megatron.training.data.preference_preprocess import preference_report_text, preprocess_preference

        return preference_report_text(preprocess_preference(preprocess_config(plan, split)))
    from megatron.training.data.sft_preprocess import preprocess_sft, sft_report_text

    return sft_report_text(preprocess_sft(preprocess_config(plan, split)))


def convert_command(plan: Plan, repo: str) -> Optional[List[str]]:
    if not plan.base_is_hf or os.path.exists(os.path.join(plan.base_checkpoint, TRACKER)):
        return None
    return [sys.executable, os.path.join(repo, "tools", "checkpoint", "util.py"), "--model-type", "GPT",
            "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", plan.cfg["base_model"],
            "--save-dir", plan.base_checkpoint, "--target-tensor-parallel-size", "1",
            "--target-pipeline-parallel-size", "1"]


def samples_per_epoch(plan: Plan, split: str) -> int:
    """Samples one pass over the preprocessed split makes (epoch 0's packing; pairs for stage dpo)."""
    cfg = plan.cfg
    if cfg["stage"] == "dpo":
        from megatron.training.data.preference_dataset import PreferenceDataset

        return PreferenceDataset(plan.data[split], cfg["seq_length"], shuffle=False).pairs
    from megatron.training.data.sft_dataset import SFTDataset

    ds = SFTDataset(plan.data[split], cfg["seq_length"], None, cfg["packing"], cfg["truncation"],
                    shuffle=split == "train", seed=cfg["seed"])
    return ds.samples_in_epoch(0)


def train_iterations(plan: Plan, train_samples: int) -> int:
    """--train-iters: num_epochs passes over `train_samples` samples."""
    return max(1, math.ceil(plan.cfg["num_epochs"] * train_samples / plan.global_batch_size))


def train_command(plan: Plan, repo: str, train_samples: int, valid_samples: Optional[int]) -> List[str]:
    """The driver command (torchrun for more than one process)."""
    cfg, gbs = plan.cfg, plan.global_batch_size
    iters_per_epoch = max(1, math.ceil(train_samples / gbs))
    train_iters = train_iterations(plan, train_samples)
    resume = os.path.exists(os.path.join(plan.checkpoints, TRACKER))
    layout = cfg["layout"]
    flags = [
        # A resumed run follows the configuration's LR schedule (it may have changed: more epochs).
        "--load", plan.checkpoints if resume else plan.base_checkpoint,
        *(["--override-opt_param-scheduler"] if resume else ["--finetune"]),
        "--use-checkpoint-args", "--save", plan.checkpoints, *plan.tokenizer,
        "--tensor-model-parallel-size", str(layout.get("tensor_parallel", 1)),
        "--pipeline-model-parallel-size", str(layout.get("pipeline_parallel", 1)),
        "--seq-length", str(cfg["seq_length"]), "--micro-batch-size", str(cfg["batch_size"]),
        "--global-batch-size", str(gbs), "--train-iters", str(train_iters),
        "--lr", str(cfg["learning_rate"]), "--min-lr", str(cfg["min_lr"]), "--lr-decay-style", cfg["lr_decay_style"],
        "--lr-warmup-fraction", str(cfg["warmup_ratio"]), "--weight-decay", str(cfg["weight_decay"]),
        "--optimizer", cfg["optimizer"], *(["--sgd-momentum", str(cfg["sgd_momentum"])]
                                            if cfg["optimizer"] == "sgd" else []),
        "--attention-dropout", str(cfg["dropout"]), "--hidden-dropout", str(cfg["dropout"]),
        "--data-path", plan.data["train"], *(["--bf16"] if cfg["bf16"] else []),
        "--seed", str(cfg["seed"]), "--log-interval", str(cfg["log_interval"]), *adapter_flags(cfg),
    ]
    if cfg["stage"] == "dpo":
        # The reference is named, so a resumed run (--load checkpoints) still finds it.
        named = cfg["lora_r"] is None and cfg["pref_loss"] not in REFERENCE_FREE and cfg["pref_reference"] != "adapters"
        flags += preference_flags(cfg) + (["--ref-load", plan.base_checkpoint] if named else [])
    else:
        flags += ["--sft-truncation", cfg["truncation"], *(["--sft-packing"] if cfg["packing"] else [])]
    if cfg["save_interval"]:
        flags += ["--save-interval", str(cfg["save_interval"])]
    if valid_samples:
        flags += ["--valid-data-path", plan.data["valid"], "--eval-interval", str(iters_per_epoch),
                  "--eval-iters", str(max(1, math.ceil(valid_samples / gbs)))]
    else:
        flags += ["--eval-iters", "0"]
    script = os.path.join(repo, STAGE_SCRIPT[cfg["stage"]])
    launcher = [sys.executable] if plan.world_size == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.world_size)]
    return launcher + [script] + flags + [str(a) for a in cfg["extra_args"]]


def export_commands(plan: Plan, repo: str) -> List[List[str]]:
    """The exports still to do: with adapters the peft directory {save_dir}/adapter, and
    (export_hf) the HF directory {save_dir}/hf, merged with the adapters."""
    util = [sys.executable, os.path.join(repo, "tools", "checkpoint", "util.py"), "--model-type", "GPT",
            "--loader", "megatron", "--load-dir", plan.checkpoints]
    commands = []
    adapter = os.path.join(plan.cfg["save_dir"], "adapter")
    if plan.cfg["lora_r"] is not None and not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        # peft's AutoPeftModel loads the base from here: the HF directory when the base came as one
        named_base = ["--base-model-name-or-path", plan.cfg["base_model"]] if plan.base_is_hf else []
        commands.append(util + ["--saver", "peft", "--save-dir", adapter, *named_base])
    out = os.path.join(plan.cfg["save_dir"], "hf")
    if plan.cfg["export_hf"] and not os.path.exists(os.path.join(out, "config.json")):
        tok = dict(zip(plan.tokenizer[::2], plan.tokenizer[1::2]))
        extra = ["--tokenizer-model", tok["--tokenizer-model"]] if tok.get("--tokenizer-model") else []
        # an HF base's config.json and generation_config.json are the export's (checkpoint_convert/hf_metadata.py)
        extra += ["--hf-base-dir", plan.cfg["base_model"]] if plan.base_is_hf else []
        commands.append(util + ["--saver", "hf", "--save-dir", out, *extra])
    return commands


def tracker_iteration(plan: Plan) -> Optional[int]:
    """The iteration the run's checkpoint tracker names; None before the first save."""
    try:
        with open(os.path.join(plan.checkpoints, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def record_if_finished(plan: Plan, train_samples: int) -> None:
    """After the training step: when {save_dir}/checkpoints reached the end of
    this configuration's training, write {save_dir}/finished.json (the
    configuration and that iteration), so a rerun knows it is done."""
    iteration = tracker_iteration(plan)
    if iteration is not None and iteration == train_iterations(plan, train_samples):
        atomic_write_text(os.path.join(plan.cfg["save_dir"], FINISHED),
                          json.dumps({"config": plan.cfg, "iteration": iteration}, indent=2))


def finished_iteration(plan: Plan) -> Optional[int]:
    """The iteration of {save_dir}/checkpoints when this very configuration
    already trained to its end there (finished.json); None otherwise. Reads two
    small files: no dataset, no model."""
    try:
        with open(os.path.join(plan.cfg["save_dir"], FINISHED), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    same_config = record.get("config") == json.loads(json.dumps(plan.cfg))
    iteration = tracker_iteration(plan)
    return iteration if same_config and iteration == record.get("iteration") else None


def outputs_summary(plan: Plan) -> str:
    """The last lines finetune.py prints: where the results are and how to load them."""
    save = plan.cfg["save_dir"]
    lines = [f"done: checkpoints in {plan.checkpoints}"]
    adapter, hf = os.path.join(save, "adapter"), os.path.join(save, "hf")
    if plan.cfg["lora_r"] is not None and os.path.isdir(adapter):
        base = plan.cfg["base_model"] if plan.base_is_hf else "<the base as an HF model>"
        lines.append(f"peft adapter: {adapter}  (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                     f"{base!r}), {adapter!r}); vLLM: --enable-lora --lora-modules NAME={adapter})")
    if plan.cfg["export_hf"] and os.path.isdir(hf):
        lines.append(f"Hugging Face model{' (adapters merged)' if plan.cfg['lora_r'] is not None else ''}: {hf}")
    return "\n".join(lines)
