"""The BERT family: Hugging Face BERT, RoBERTa (and DistilRoBERTa, a RoBERTa
config) and Megatron-BERT <-> megatron-core's BertModel (megatron/training/bert/model.py).

- BERT and RoBERTa are post-LN: their LayerNorms map onto the post-LN layer
  shifted by one (embeddings.LayerNorm -> layers.0.input_layernorm, layer i's
  attention.output.LayerNorm -> layers.i.pre_mlp_layernorm, layer i's
  output.LayerNorm -> layers.(i+1).input_layernorm, the last -> final_layernorm).
  Megatron-BERT is pre-LN: attention.ln, ln and encoder.ln map one to one.
- linear_qkv rows (weights and biases) are per head [q_h; k_h; v_h]
  (megatron-core's layout for as many query groups as heads).
- RoBERTa counts positions from padding_idx + 1: its whole position table is
  kept and the model's position ids start at --position-ids-offset
  padding_idx + 1, so HF -> Megatron -> HF is bitwise.
- The LM output bias has one entry per vocabulary row: Megatron's padded rows
  are dropped on export (and never win: the model masks their logits).

Heads by HF class (`ROLES`): *Model (pooler), *ForMaskedLM (LM head),
BertForPreTraining / MegatronBertForPreTraining (pooler, LM head, binary
head), *ForSequenceClassification (pooler, classifier).
"""

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.training.checkpoint_convert.core import (
    ConversionError, ModelSource, cast, dtype_and_tokenizer_flags, progress,
)
from megatron.training.checkpoint_convert.hf_files import HFWeights, ShardedSafetensorsWriter
from megatron.training.checkpoint_convert.hf_tokenizer import (
    check_tokenizer_vocab, export_tokenizer, find_tokenizer,
)
from megatron.training.checkpoint_convert.verify import Outputs
from megatron.training.models.hf_names import EMBEDDING, join_qkv, split_qkv
from megatron.training.sharding import fit_vocab_rows
from megatron.training.sizes import padded_vocab_size

FINAL_NORM = "encoder.final_layernorm."


def _wb(megatron: str, hf: str) -> Tuple[Tuple[str, str], ...]:
    """(megatron, HF) name pairs of a module's weight and bias."""
    return ((f"{megatron}.weight", f"{hf}.weight"), (f"{megatron}.bias", f"{hf}.bias"))


# (megatron-core name inside encoder.layers.<i>., HF names inside encoder.layer.<i>., how they combine)
LAYER_TABLE = (
    ("self_attention.linear_qkv.weight",
     ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"), "qkv"),
    ("self_attention.linear_qkv.bias",
     ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"), "qkv"),
    ("self_attention.linear_proj.weight", ("attention.output.dense.weight",), "copy"),
    ("self_attention.linear_proj.bias", ("attention.output.dense.bias",), "copy"),
    ("mlp.linear_fc1.weight", ("intermediate.dense.weight",), "copy"),
    ("mlp.linear_fc1.bias", ("intermediate.dense.bias",), "copy"),
    ("mlp.linear_fc2.weight", ("output.dense.weight",), "copy"),
    ("mlp.linear_fc2.bias", ("output.dense.bias",), "copy"),
)
EMBEDDING_TABLE = (
    (EMBEDDING, "{base}embeddings.word_embeddings.weight"),
    ("embedding.position_embeddings.weight", "{base}embeddings.position_embeddings.weight"),
    ("embedding.tokentype_embeddings.weight", "{base}embeddings.token_type_embeddings.weight"),
)
# Where each LayerNorm of layer {i} comes from ({prev} = i - 1, {last} = the last layer);
# `first` is input_layernorm of layer 0 when it differs.
POST_LN_NORMS = {"input_layernorm": "{base}encoder.layer.{prev}.output.LayerNorm",
                 "first": "{base}embeddings.LayerNorm",
                 "pre_mlp_layernorm": "{base}encoder.layer.{i}.attention.output.LayerNorm",
                 "final_layernorm": "{base}encoder.layer.{last}.output.LayerNorm"}
PRE_LN_NORMS = {"input_layernorm": "{base}encoder.layer.{i}.attention.ln",
                "pre_mlp_layernorm": "{base}encoder.layer.{i}.ln",
                "final_layernorm": "{base}encoder.ln"}

_BERT_HEADS = {
    "pooler": _wb("pooler.dense", "{base}pooler.dense"),
    "lm": _wb("lm_head.dense", "cls.predictions.transform.dense")
    + _wb("lm_head.layer_norm", "cls.predictions.transform.LayerNorm")
    + (("output_layer.bias", "cls.predictions.bias"),),
    "binary": _wb("binary_head", "cls.seq_relationship"),
    "classifier": _wb("classification_head", "classifier"),
}
_ROBERTA_HEADS = {
    "pooler": _wb("pooler.dense", "{base}pooler.dense"),
    "lm": _wb("lm_head.dense", "lm_head.dense") + _wb("lm_head.layer_norm", "lm_head.layer_norm")
    + (("output_layer.bias", "lm_head.bias"),),
    # RobertaForSequenceClassification's head is dense + tanh (the pooler's maths) then out_proj
    "classifier": _wb("pooler.dense", "classifier.dense") + _wb("classification_head", "classifier.out_proj"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json model_type
    class_prefix: str  # HF class names: <prefix>Model, <prefix>ForMaskedLM, ...
    base: str  # the encoder's weight prefix inside the task models
    norms: Dict[str, str]
    heads: Dict[str, Tuple[Tuple[str, str], ...]]
    position_offset_from_pad: bool  # RoBERTa: positions start at padding_idx + 1


FAMILIES = {
    "bert": Family("bert", "Bert", "bert.", POST_LN_NORMS, _BERT_HEADS, False),
    "roberta": Family("roberta", "Roberta", "roberta.", POST_LN_NORMS, _ROBERTA_HEADS, True),
    "megatron-bert": Family("megatron-bert", "MegatronBert", "bert.", PRE_LN_NORMS, _BERT_HEADS, False),
}
HF_MODEL_TYPES = tuple(FAMILIES)

# HF class suffix -> the heads it has, in the order written
ROLES = {
    "Model": ("pooler",),
    "ForMaskedLM": ("lm",),
    "ForPreTraining": ("pooler", "lm", "binary"),
    "ForSequenceClassification": ("pooler", "classifier"),
}
# RoBERTa's classifier carries its own dense layer in place of the pooler
_OWN_POOLER = {("roberta", "ForSequenceClassification")}

# Old BERT checkpoints name LayerNorm parameters gamma / beta and keep the LM bias on the decoder.
_ALIASES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"),
            ("cls.predictions.bias", "cls.predictions.decoder.bias"))


def head_pairs(family: Family, suffix: str) -> List[Tuple[str, str]]:
    """(megatron, HF) tensor names of the heads of the HF class `<family><suffix>`."""
    pairs = []
    for role in ROLES[suffix]:
        if role == "pooler" and (family.model_type, suffix) in _OWN_POOLER:
            continue
        pairs += family.heads[role]
    return pairs


def _architecture(config: dict) -> Tuple[Family, str]:
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise ConversionError(f"config.json has model_type {kind!r}, not one of the BERT family "
                              f"({', '.join(HF_MODEL_TYPES)})")
    family = FAMILIES[kind]
    names = config.get("architectures") or [f"{family.class_prefix}Model"]
    suffix = names[0][len(family.class_prefix):] if names[0].startswith(family.class_prefix) else None
    if suffix not in ROLES:
        supported = ", ".join(f"{family.class_prefix}{s}" for s in ROLES
                              if (s != "ForPreTraining" or kind != "roberta"))
        raise ConversionError(f"config.json architectures {names}: the converter supports {supported}")
    return family, suffix


# ------------------------------------------------------------------ configs

def megatron_flags_from_hf(config: dict, tokenizer: Optional[Sequence[str]] = None) -> List[str]:
    """The flags (pretrain_bert.py / finetune_classification.py) that build the model of an HF config.json."""
    family, suffix = _architecture(config)
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"config.json hidden_act {act!r}: the BERT models here use the exact (erf) GELU, "
                              "'gelu'; a tanh-approximated GELU would change every output")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"config.json position_embedding_type {config['position_embedding_type']!r}: only "
                              "'absolute' (learned) positions are supported")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    offset = config["pad_token_id"] + 1 if family.position_offset_from_pad else 0
    positions = config["max_position_embeddings"]
    flags = [
        "--num-layers", str(config["num_hidden_layers"]), "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(config["intermediate_size"]), "--num-attention-heads", str(heads),
        "--kv-channels", str(hidden // heads), "--seq-length", str(positions - offset),
        "--max-position-embeddings", str(positions), "--position-ids-offset", str(offset),
        "--num-tokentypes", str(config.get("type_vocab_size", 2)),
        "--norm-epsilon", str(config.get("layer_norm_eps", 1e-12)), "--vocab-size", str(config["vocab_size"]),
        "--init-method-std", str(config.get("initializer_range", 0.02)),
        "--hidden-dropout", str(config.get("hidden_dropout_prob", 0.1)),
        "--attention-dropout", str(config.get("attention_probs_dropout_prob", 0.1)),
    ]
    if family.norms is POST_LN_NORMS:
        flags.append("--apply-residual-connection-post-layernorm")
    if "binary" not in ROLES[suffix]:
        flags.append("--bert-no-binary-head")
    if suffix == "ForSequenceClassification":
        labels = config.get("id2label") or {}
        n = config.get("num_labels") or len(labels) or 2
        flags += ["--num-classes", str(n)]
        if labels:
            flags += ["--labels", ",".join(str(labels.get(str(i), labels.get(i, i))) for i in range(n))]
    return flags + dtype_and_tokenizer_flags(config, tokenizer)


def family_of_megatron(args: dict) -> Family:
    """The HF family a Megatron BERT checkpoint exports to: pre-LN -> Megatron-BERT;
    post-LN with positions from an offset -> RoBERTa; post-LN -> BERT."""
    wrong = {k: args.get(k) for k, want in (("normalization", "LayerNorm"), ("swiglu", False),
                                            ("add_bias_linear", True),
                                            ("position_embedding_type", "learned_absolute"),
                                            ("untie_embeddings_and_output_weights", False)) if args.get(k) != want}
    heads = args["num_attention_heads"]
    if (args.get("num_query_groups") or heads) != heads:
        wrong["num_query_groups"] = args["num_query_groups"]
    if (args.get("kv_channels") or args["hidden_size"] // heads) * heads != args["hidden_size"]:
        wrong["kv_channels"] = args["kv_channels"]
    if wrong:
        found = ", ".join(f"{k}={v}" for k, v in wrong.items())
        raise ConversionError(f"the checkpoint is not a BERT-architecture model ({found}): HF BERT models need "
                              "LayerNorm, GELU, biases, learned positions, tied embeddings and as many query groups "
                              "as heads")
    if not args.get("apply_residual_connection_post_layernorm"):
        return FAMILIES["megatron-bert"]
    return FAMILIES["roberta"] if args.get("position_ids_offset") else FAMILIES["bert"]


def hf_config_from_megatron(args: dict, family: Family, suffix: str, vocab_rows: int, dtype: torch.dtype,
                            special: dict) -> dict:
    config = {
        "architectures": [f"{family.class_prefix}{suffix}"], "model_type": family.model_type,
        "vocab_size": vocab_rows, "hidden_size": args["hidden_size"], "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_attention_heads"], "intermediate_size": args["ffn_hidden_size"],
        "hidden_act": "gelu", "hidden_dropout_prob": args.get("hidden_dropout", 0.1),
        "attention_probs_dropout_prob": args.get("attention_dropout", 0.1),
        "max_position_embeddings": args["max_position_embeddings"],
        "type_vocab_size": max(args.get("num_tokentypes") or 0, 1),
        "initializer_range": args.get("init_method_std", 0.02),
        "layer_norm_eps": args["norm_epsilon"], "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "torch_dtype": str(dtype).replace("torch.", ""),
        "dtype": str(dtype).replace("torch.", ""),
        "pad_token_id": special.get("pad_token_id") if special.get("pad_token_id") is not None else 0,
    }
    if family.position_offset_from_pad:
        config["pad_token_id"] = args["position_ids_offset"] - 1
        config.update(bos_token_id=special.get("bos_token_id", 0), eos_token_id=special.get("eos_token_id", 2))
    if suffix == "ForSequenceClassification":
        n = args["num_classes"]
        labels = (args.get("labels") or "").split(",") if args.get("labels") else [f"LABEL_{i}" for i in range(n)]
        config.update(num_labels=n, id2label={str(i): label for i, label in enumerate(labels)},
                      label2id={label: i for i, label in enumerate(labels)},
                      problem_type="single_label_classification")
    return config


# ------------------------------------------------------------------ HF -> Megatron

class BertHFSource(ModelSource):
    """An HF BERT / RoBERTa / Megatron-BERT directory (config.json + weights [+ tokenizer])."""

    format = "hf"

    def __init__(self, model_dir: str, tokenizer_model: Optional[str] = None):
        from megatron.training.arguments import parse_args
        from megatron.training.checkpoint.settings import args_to_dict
        from megatron.training.bert.arguments import add_bert_and_classification_args

        self.path = os.path.abspath(model_dir)
        with open(os.path.join(self.path, "config.json")) as f:
            self.config = json.load(f)
        self.family, self.suffix = _architecture(self.config)
        tokenizer = find_tokenizer(self.path, tokenizer_model)
        self.flags = megatron_flags_from_hf(self.config, tokenizer)
        self.args = args_to_dict(parse_args(self.flags, add_bert_and_classification_args))
        self.vocab_size = self.config["vocab_size"]
        check_tokenizer_vocab(tokenizer, self.vocab_size, "its HF directory")
        self.weights = HFWeights(self.path)
        # Task models keep the encoder under `bert.` / `roberta.`; a saved *Model has no prefix.
        self.base = self.family.base if f"{self.family.base}embeddings.word_embeddings.weight" in self.weights else ""
        self.heads = head_pairs(self.family, self.suffix)
        if (self.suffix == "Model" and not self._present(self.heads[0][1])):
            self.heads = []  # a BertModel saved without its pooler
        self.has_output_layer = self.suffix != "ForSequenceClassification"
        self.verify_outputs = VERIFY_OUTPUTS

    def _hf(self, template: str, **index) -> str:
        return template.format(base=self.base, **index)

    def _present(self, template: str) -> bool:
        return self._resolve(self._hf(template)) is not None

    def _resolve(self, name: str) -> Optional[str]:
        if name in self.weights:
            return name
        for new, old in _ALIASES:
            if name.endswith(new) and name[: -len(new)] + old in self.weights:
                return name[: -len(new)] + old
        return None

    def _read(self, names: Dict[str, str]) -> Dict[str, torch.Tensor]:
        """{megatron name: HF name} -> {megatron name: tensor}."""
        resolved = {mg: self._resolve(hf) or hf for mg, hf in names.items()}
        tensors = self.weights.read(resolved.values())  # a missing name fails here, naming it
        return {mg: tensors[hf] for mg, hf in resolved.items()}

    def embedding(self):
        names = {mg: self._hf(hf) for mg, hf in EMBEDDING_TABLE}
        if not self.args["num_tokentypes"]:
            names.pop("embedding.tokentype_embeddings.weight")
        return self._read(names)

    def _norm(self, which: str, i: int) -> str:
        norms = self.family.norms
        template = norms["first"] if which == "input_layernorm" and i == 0 and "first" in norms else norms[which]
        return self._hf(template, i=i, prev=i - 1, last=self.num_layers - 1)

    def layer(self, index):
        prefix = self._hf("{base}encoder.layer.{i}.", i=index)
        names = {prefix + hf: prefix + hf for _, hf_names, _ in LAYER_TABLE for hf in hf_names}
        norms = {f"{which}.{p}": f"{self._norm(which, index)}.{p}"
                 for which in ("input_layernorm", "pre_mlp_layernorm") for p in ("weight", "bias")}
        hf = self._read(dict(names, **norms))
        out = {}
        for mg, hf_names, how in LAYER_TABLE:
            parts = [hf[prefix + n] for n in hf_names]
            out[f"encoder.layers.{index}.{mg}"] = (
                join_qkv(*parts, groups=self.args["num_attention_heads"]) if how == "qkv" else parts[0])
        out.update((f"encoder.layers.{index}.{mg}", hf[mg]) for mg in norms)
        return out

    def final(self):
        names = {f"{FINAL_NORM}{p}": f"{self._norm('final_layernorm', 0)}.{p}" for p in ("weight", "bias")}
        names.update((mg, self._hf(hf)) for mg, hf in self.heads)
        return self._read(names)


# ------------------------------------------------------------------ Megatron -> HF

def _hf_class_suffix(family: Family, heads: set) -> str:
    """The HF class for the heads a checkpoint has (RoBERTa has no *ForPreTraining)."""
    if "classification_head.weight" in heads:
        return "ForSequenceClassification"
    if "lm_head.dense.weight" in heads:
        pretraining = "binary_head.weight" in heads and family.model_type != "roberta"
        return "ForPreTraining" if pretraining else "ForMaskedLM"
    return "Model"


def save_bert_hf(source: ModelSource, out_dir: str, dtype: Optional[torch.dtype] = None, divisible_by: int = 1,
                 max_shard_bytes: int = 5 * 10 ** 9, tokenizer_model: Optional[str] = None) -> dict:
    """Write `source` (a Megatron BertModel) as an HF directory of the matching
    class (module doc): safetensors shards (+ index), config.json and the
    tokenizer files. Returns the config written."""
    args = source.args
    family = family_of_megatron(args)
    rows = padded_vocab_size(source.vocab_size or args["padded_vocab_size"], divisible_by, 1)
    special = _export_tokenizer(args, out_dir, tokenizer_model)
    tail = source.final()
    suffix = _hf_class_suffix(family, set(tail))
    base = "" if suffix == "Model" else family.base
    fill = lambda template, **i: template.format(base=base, **i)  # noqa: E731
    norms = family.norms

    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    first = source.embedding()
    dtype = dtype or first[EMBEDDING].dtype
    first = cast(first, dtype)
    for mg, hf in EMBEDDING_TABLE:
        if mg in first:
            writer.add({fill(hf): fit_vocab_rows(first[mg], rows) if mg == EMBEDDING else first[mg]})
        elif mg == "embedding.tokentype_embeddings.weight":  # HF always adds one: a zero row adds nothing
            writer.add({fill(hf): first[EMBEDDING].new_zeros(1, args["hidden_size"])})
    del first
    bar = progress(source.num_layers, "writing HF safetensors")
    for i in range(source.num_layers):
        tensors = cast(source.layer(i), dtype)
        writer.add(_hf_layer(tensors, i, args, fill, norms))
        bar.update(1)
    bar.close()
    tail = cast(tail, dtype)
    last = norms["final_layernorm"]
    writer.add({fill(f"{last}.{p}", last=source.num_layers - 1): tail[f"{FINAL_NORM}{p}"] for p in ("weight", "bias")})
    for mg, hf in head_pairs(family, suffix):
        if mg in tail:
            writer.add({fill(hf): fit_vocab_rows(tail[mg], rows) if mg == "output_layer.bias" else tail[mg]})
    if suffix != "Model" and "binary_head.weight" in tail and "binary" not in ROLES[suffix]:
        print(f"note: {family.class_prefix}{suffix} has no sentence-order head; the binary head is not exported")
    writer.close()

    config = hf_config_from_megatron(args, family, suffix, rows, dtype, special)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def _hf_layer(tensors: Dict[str, torch.Tensor], index: int, args: dict, fill, norms: Dict[str, str]):
    heads = args["num_attention_heads"]
    head_dim = args.get("kv_channels") or args["hidden_size"] // heads
    prefix = fill("{base}encoder.layer.{i}.", i=index)
    out = {}
    for mg, hf_names, how in LAYER_TABLE:
        value = tensors[f"encoder.layers.{index}.{mg}"]
        parts = split_qkv(value, heads, heads, head_dim) if how == "qkv" else (value,)
        out.update((prefix + n, p.contiguous()) for n, p in zip(hf_names, parts))
    for which in ("input_layernorm", "pre_mlp_layernorm"):
        template = norms["first"] if which == "input_layernorm" and index == 0 and "first" in norms else norms[which]
        for p in ("weight", "bias"):
            out[f"{fill(template, i=index, prev=index - 1)}.{p}"] = tensors[f"encoder.layers.{index}.{which}.{p}"]
    return out


def _export_tokenizer(args: dict, out_dir: str, tokenizer_model: Optional[str]) -> dict:
    if tokenizer_model:
        kind, path = find_tokenizer(out_dir, tokenizer_model)
    else:
        kind, path = args.get("tokenizer_type"), args.get("tokenizer_model") or args.get("vocab_file")
    if not path or kind in (None, "NullTokenizer"):
        return {}
    if not os.path.exists(path):
        raise ConversionError(f"the checkpoint's tokenizer {path} is not on this machine: "
                              "give it with --tokenizer-model")
    return export_tokenizer(kind, path, out_dir)


# ------------------------------------------------------------------ --verify

def verify_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The verification ids without 0 and 1 (BERT's [PAD], RoBERTa's <s> and
    <pad>): RoBERTa gives a pad id no position, which a right-padded batch
    never has mid-sequence."""
    return tokens.clamp(min=2)


def verify_context(args: dict) -> int:
    """Positions a row may use: the sequence length (RoBERTa's table also holds padding_idx + 1 rows)."""
    return args.get("seq_length") or args["max_position_embeddings"] - (args.get("position_ids_offset") or 0)


def hf_outputs(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """MLM logits [rows, s, V], class logits [rows, k] or final hidden states [rows, s, h], by the HF class."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        architecture = json.load(f)["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(path, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        out = model.eval()(tokens)
    for field in ("prediction_logits", "logits", "last_hidden_state"):
        if getattr(out, field, None) is not None:
            return out[field].float()
    raise ConversionError(f"{architecture} returned none of prediction_logits, logits, last_hidden_state")


def megatron_load(path: str, tp: int, pp: int):
    from megatron.training.bert import inference as bert_inference

    return bert_inference.load_bert_model(path, tp, pp)


def megatron_forward(args, model: list, tokens: torch.Tensor, path: str) -> torch.Tensor:
    """The same outputs from a Megatron checkpoint (its heads decide which); collective."""
    from megatron.training.bert import inference as bert_inference

    return bert_inference.bert_outputs(args, model, tokens, output=bert_inference.output_kind(path))


# What --verify compares, by the model's heads (a checkpoint's: bert_inference.output_kind; an HF
# class's: its suffix, as in ROLES): an encoder without heads (an HF *Model) has no logits, and the
# report says so.
OUTPUT_NAMES = {"lm": "masked-LM logits", "classes": "class logits",
                "hidden": "final hidden states (an encoder without heads: no logits)"}
HF_OUTPUT_KINDS = {"Model": "hidden", "ForMaskedLM": "lm", "ForPreTraining": "lm",
                   "ForSequenceClassification": "classes"}


def verify_outputs_name(side) -> str:
    """OUTPUT_NAMES for a --verify side: a Megatron checkpoint by its heads, an HF directory by its class."""
    if side.format == "megatron":
        from megatron.training.bert import inference as bert_inference

        return OUTPUT_NAMES[bert_inference.output_kind(side.path)]
    with open(os.path.join(side.path, "config.json")) as f:
        return OUTPUT_NAMES[HF_OUTPUT_KINDS[_architecture(json.load(f))[1]]]


VERIFY_OUTPUTS = Outputs(hf=hf_outputs, load=megatron_load, forward=megatron_forward, context=verify_context,
                         tokens=verify_tokens, name=verify_outputs_name)


def hf_source(model_dir: str, tokenizer_model: Optional[str] = None) -> BertHFSource:
    return BertHFSource(model_dir, tokenizer_model)
save_hf = save_bert_hf
