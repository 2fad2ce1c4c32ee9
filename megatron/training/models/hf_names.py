"""Where each tensor of a model lives, in megatron-core's state-dict names and
in Hugging Face's, as tables. A leaf shared by the checkpoint converters
(checkpoint_convert/) and the adapters (peft/), so there is one description of
each layout and neither imports the other.

Layouts (checked against the GPTModel the driver builds):
- linear_qkv rows are grouped per query group g: [the g-th group's
  heads/groups query heads; k_g; v_g], head_dim rows each; HF keeps q, k, v
  as three matrices (`join_qkv` / `split_qkv`). Both apply RoPE as
  rotate-half: no row permutation.
- linear_fc1.weight = [gate_proj; up_proj].
- embedding / output rows may carry Megatron's vocabulary padding; the HF
  side has exactly config.vocab_size rows.
- Qwen2's q/k/v biases (--add-qkv-bias) join like the weights' rows; Qwen3's
  per-head RMSNorm weights of q and k (--qk-layernorm, [head_dim] each) are
  megatron-core's q_layernorm / k_layernorm, the same on every TP rank.
"""

import torch

# megatron-core GPTModel names outside the transformer layers.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# Llama (LlamaForCausalLM): (megatron-core name inside decoder.layers.<i>., HF names inside
# model.layers.<i>., how the HF tensors combine: "copy", "cat" (rows stacked) or "qkv" (join_qkv)).
LLAMA_LAYERS = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "cat"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
# Rows some families add to LLAMA_LAYERS, by the megatron-core setting that creates the tensors.
QKV_BIAS_LAYERS = (
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
)
QK_NORM_LAYERS = (
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
)
# The HF decoder families that are Llama's layer plus some of those rows: model_type ->
# (the transformers class, the megatron-core settings (flag dests) the family always has).
DECODER_FAMILIES = {
    "llama": ("LlamaForCausalLM", ()),
    "mistral": ("MistralForCausalLM", ()),
    "qwen2": ("Qwen2ForCausalLM", ("add_qkv_bias",)),
    "qwen3": ("Qwen3ForCausalLM", ("qk_layernorm",)),
}
_EXTRA_LAYERS = {"add_qkv_bias": QKV_BIAS_LAYERS, "qk_layernorm": QK_NORM_LAYERS}


def decoder_layers(args: dict) -> tuple:
    """The layer table of a decoder with these Megatron settings (flag dests):
    LLAMA_LAYERS plus the rows of each extra tensor the settings create."""
    return LLAMA_LAYERS + tuple(row for setting, rows in _EXTRA_LAYERS.items() if args.get(setting) for row in rows)


# (megatron-core name, HF name) of the tensors outside the layers.
LLAMA_GLOBALS = ((EMBEDDING, "model.embed_tokens.weight"), (FINAL_NORM, "model.norm.weight"),
                 (OUTPUT_LAYER, "lm_head.weight"))


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v projections (weights [rows, hidden] or biases [rows]) ->
    megatron-core's linear_qkv rows: per query group g, [its query heads; k_g; v_g]."""
    parts = [x.reshape(groups, -1, *x.shape[1:]) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of join_qkv: (q, k, v)."""
    rest = qkv.shape[1:]
    per_group = heads // groups * head_dim
    q, k, v = torch.split(qkv.reshape(groups, per_group + 2 * head_dim, *rest), [per_group, head_dim, head_dim], 1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)
