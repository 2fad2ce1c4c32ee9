"""Llama-family GPT models on megatron-core's `GPTModel`.

Llama = RMSNorm + SwiGLU + RoPE + no biases (+ GQA, tied or untied
embeddings, Llama 3.x rope scaling); Qwen2 adds q/k/v biases
(--add-qkv-bias), Qwen3 a per-head RMSNorm of q and k (--qk-layernorm). All
of it is megatron-core's own modules, selected by a layer spec. Transformer
Engine's spec is used when `--transformer-impl transformer_engine` (the
default when it imports); otherwise the local spec, whose core attention is
torch SDPA (`SDPAttention`) unless `--attention-backend unfused` asks for
megatron-core's unfused softmax (models/attention_backend.py).
"""

import copy

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron.training.models import attention_backend
from megatron.training.models.norms import LocalNorm
from megatron.training.models.padded_vocab import exclude_padded_vocab
from megatron.training.models.sdpa_attention import SDPAttention
from megatron.training.peft.quantized import quantize_layer_spec


def build_llama_layer_spec(args, num_layers_in_chunk: int):
    """The transformer spec for the flags' implementation choice: Transformer
    Engine's layer spec, or the local one as a block spec whose norms
    (`LocalNorm`) support sequence parallelism."""
    if args.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    layer = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm,
                                                                   normalization=args.normalization))
    layer.submodules.input_layernorm = LocalNorm
    layer.submodules.pre_mlp_layernorm = LocalNorm
    if args.qk_layernorm:  # megatron-core's finalize_model_grads sums their gradients over TP (by name)
        layer.submodules.self_attention.submodules.q_layernorm = LocalNorm
        layer.submodules.self_attention.submodules.k_layernorm = LocalNorm
    if attention_backend.local_core_attention(args) == "sdpa":
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    if getattr(args, "lora_quant_bits", None):  # QLoRA: the dense linears keep their weights quantised
        quantize_layer_spec(layer, args.lora_quant_bits)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_in_chunk, layer_norm=LocalNorm)


def attention_backend_name(args) -> str:
    """What attention implementation runs, for the start-up log."""
    return attention_backend.describe(args)


def build_gpt_model(args, config, pre_process=None, post_process=None, vp_stage=None) -> GPTModel:
    """One model chunk for this rank's pipeline stage (or virtual stage); the
    logits of the vocabulary's padding rows are -inf (models/padded_vocab.py)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_llama_layer_spec(args, _layers_in_chunk(args)),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    exclude_padded_vocab(model, getattr(args, "unpadded_vocab_size", None), args.padded_vocab_size,
                         parallel_state.get_tensor_model_parallel_rank())
    return model


def _layers_in_chunk(args) -> int:
    return args.num_layers // (args.pipeline_model_parallel_size * (args.virtual_pipeline_model_parallel_size or 1))
