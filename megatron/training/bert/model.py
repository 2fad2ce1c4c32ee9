"""BERT-family encoders on megatron-core's `BertModel`: BERT, RoBERTa and
DistilRoBERTa (post-LN, Hugging Face compatible) and Megatron-BERT (pre-LN).

megatron-core's BERT layer is pre-LN only (`apply_residual_connection_post_layernorm`
is dead code in core). `PostLNTransformerLayer` keeps the stock parameter names
and computes the original BERT ordering, Megatron-LM's
`--apply-residual-connection-post-layernorm`:

    y = input_layernorm(x);  x1 = y + attn(y);  z = pre_mlp_layernorm(x1);  out = z + mlp(z)

so an HF post-LN model maps onto it with its LayerNorms shifted by one:
embeddings.LayerNorm -> layers.0.input_layernorm, layer i's
attention.output.LayerNorm -> layers.i.pre_mlp_layernorm, layer i's
output.LayerNorm -> layers.(i+1).input_layernorm (the last one: final_layernorm).

`BertFamilyModel` adds to `BertModel` what the HF families need: position ids
starting at an offset (RoBERTa counts from padding_idx + 1), token types that
default to 0, padded-vocabulary logits that never win, MLM accuracy, a
sequence-classification head (pooler + dropout + linear, the maths of both
BERT's pooler and RoBERTa's dense+tanh head) instead of the LM head, final
hidden states on request, and a core-attention check that accepts the
project's SDPA attention (megatron-core's check assumes Transformer Engine).
"""

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.bert import bert_layer_specs, bert_lm_head
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.bert.pooler import Pooler
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, get_linear_layer
from megatron.core.utils import make_viewless_tensor

from megatron.training.errors import ArgumentError
from megatron.training.models import attention_backend
from megatron.training.models.norms import LocalNorm
from megatron.training.models.padded_vocab import exclude_padded_vocab
from megatron.training.models.sdpa_attention import SDPAttention

# Modules a model may start afresh, or drop, when it is initialised from a
# checkpoint with other heads (checkpoint loading on --finetune or a
# release): pretraining from an HF BertModel, classifying with a pretrained model.
HEAD_PREFIXES = ("lm_head.", "output_layer.", "binary_head.", "pooler.", "classification_head.")


class PostLNTransformerLayer(TransformerLayer):
    """A transformer layer with the residual taken after each LayerNorm
    (original BERT); the parameter names are TransformerLayer's. The first
    layer of the model also applies the hidden dropout after its input
    LayerNorm, where HF applies the embedding dropout (the model turns the
    embedding's own dropout off)."""

    def _forward_attention(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                           rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                           attention_bias=None, inference_context=None, packed_seq_params=None,
                           sequence_len_offset=None, padding_mask=None, *, inference_params=None):
        normed = self.input_layernorm(hidden_states)
        if self.layer_number == 1:
            normed = F.dropout(normed, p=self.hidden_dropout, training=self.training)
        attention = self.self_attention(
            normed, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset)
        with self.bias_dropout_add_exec_handler():
            out = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention, normed, self.hidden_dropout)
        return out, context

    def _forward_mlp(self, hidden_states, inference_context=None, padding_mask=None):
        normed = self.pre_mlp_layernorm(hidden_states)
        mlp = self.mlp(normed)
        with self.bias_dropout_add_exec_handler():
            out = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(mlp, normed, self.hidden_dropout)
        return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)


def build_bert_layer_spec(args, num_layers_in_chunk: int) -> TransformerBlockSubmodules:
    """The block spec for the flags: post-LN (--apply-residual-connection-post-layernorm)
    or pre-LN layers; Transformer Engine modules when --transformer-impl is
    transformer_engine, else megatron-core's local modules with `LocalNorm`
    (sequence-parallel capable) and SDPA core attention with a key-padding mask
    (megatron-core's unfused one with --attention-backend unfused)."""
    post_ln = args.apply_residual_connection_post_layernorm
    if args.transformer_impl == "transformer_engine":
        layer, norm = _transformer_engine_layer(post_ln)
    else:
        layer = copy.deepcopy(bert_layer_specs.bert_layer_local_spec)
        layer.submodules.input_layernorm = LocalNorm
        layer.submodules.pre_mlp_layernorm = LocalNorm
        if attention_backend.local_core_attention(args) == "sdpa":
            layer.submodules.self_attention.submodules.core_attention = SDPAttention
        norm = LocalNorm
    if post_ln:
        layer.module = PostLNTransformerLayer
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_in_chunk, layer_norm=norm)


def _transformer_engine_layer(post_ln: bool):
    """(layer spec, norm) with Transformer Engine modules. Pre-LN: megatron-core's
    BERT TE spec (norms fused into the following linear layers). Post-LN needs
    each norm's output as the residual, so the norms stay separate modules."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear, TEDotProductAttention, TENorm, TERowParallelLinear,
    )

    if not post_ln:
        return bert_layer_specs.get_bert_layer_with_transformer_engine_spec(), TENorm
    layer = copy.deepcopy(bert_layer_specs.bert_layer_local_spec)
    layer.submodules.input_layernorm = TENorm
    layer.submodules.pre_mlp_layernorm = TENorm
    attention = layer.submodules.self_attention.submodules
    attention.linear_qkv, attention.core_attention, attention.linear_proj = (
        TEColumnParallelLinear, TEDotProductAttention, TERowParallelLinear)
    layer.submodules.mlp.submodules.linear_fc1 = TEColumnParallelLinear
    layer.submodules.mlp.submodules.linear_fc2 = TERowParallelLinear
    return layer, TENorm


@contextlib.contextmanager
def _lm_head_norm(norm_class):
    """megatron-core builds BertLMHead's LayerNorm from a module-level choice
    (apex's, else torch's wrapper, which refuses sequence parallelism): build it
    as `norm_class` instead, which tags its weights for the sequence-parallel
    gradient reduction as apex's FusedLayerNorm does."""
    original = bert_lm_head.LNImpl
    bert_lm_head.LNImpl = norm_class
    try:
        yield
    finally:
        bert_lm_head.LNImpl = original


class BertFamilyModel(BertModel):
    """megatron-core's BertModel with the HF families' conventions (module doc).

    unpadded_vocab_size: ids at or above it are vocabulary padding; their
        logits are -inf (models/padded_vocab.py), so they never win and add
        nothing to the softmax (None: unknown, nothing is masked).
    position_ids_offset: the first position id (RoBERTa: padding_idx + 1).
    num_classes: > 0 builds a classifier (pooler, dropout, classification_head)
        in place of the LM and binary heads.
    """

    fresh_head_prefixes = HEAD_PREFIXES

    def __init__(self, config, transformer_layer_spec, vocab_size: int, max_sequence_length: int,
                 num_tokentypes: int = 0, add_binary_head: bool = False, unpadded_vocab_size: Optional[int] = None,
                 position_ids_offset: int = 0, num_classes: int = 0, classifier_dropout: float = 0.1,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        classifier = num_classes > 0
        norm = transformer_layer_spec.layer_norm if isinstance(
            transformer_layer_spec, TransformerBlockSubmodules) else LocalNorm
        with _lm_head_norm(norm):
            super().__init__(
                config=config, num_tokentypes=num_tokentypes, transformer_layer_spec=transformer_layer_spec,
                vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
                post_process=post_process, parallel_output=True,
                # A classifier has no output layer: nothing to tie (on every stage,
                # so the pipeline's embedding all-reduce is skipped everywhere).
                share_embeddings_and_output_weights=not classifier,
                position_embedding_type="learned_absolute", add_binary_head=add_binary_head and not classifier,
                vp_stage=vp_stage)
        self.position_ids_offset = position_ids_offset
        self.num_classes = num_classes
        if self.pre_process and _first_layer_post_ln(self):
            self.embedding.embedding_dropout.p = 0.0  # applied after the first LayerNorm instead
        if self.post_process and classifier:
            del self.lm_head, self.output_layer
            self.pooler = Pooler(config.hidden_size, config.init_method, config, config.sequence_parallel)
            self.classification_dropout = torch.nn.Dropout(classifier_dropout)
            self.classification_head = get_linear_layer(config.hidden_size, num_classes, config.init_method,
                                                        config.perform_initialization)
        exclude_padded_vocab(self, unpadded_vocab_size, vocab_size, parallel_state.get_tensor_model_parallel_rank())

    # ------------------------------------------------------------ megatron-core hooks

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        spec = self.transformer_layer_spec
        layer = spec.layer_specs[0] if isinstance(spec, TransformerBlockSubmodules) else spec
        if layer.submodules.self_attention.submodules.core_attention is SDPAttention:
            # SDPA broadcasts a key-padding mask [b, 1, 1, s] over heads and queries.
            layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
            return "b11s"
        self.transformer_layer_spec = layer  # megatron-core's check reads a layer spec
        try:
            return super()._sanity_check_attention_and_get_attn_mask_dimension()
        finally:
            self.transformer_layer_spec = spec

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron-core's (--ckpt-format torch_dist). A classifier's last stage
        has no output layer, which LanguageModule's version expects there (to
        pad its rows): the classifier's entries are the modules' own."""
        if self.post_process and self.num_classes > 0:
            return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets,
                                                     ensure_metadata_has_dp_cp_group(metadata))
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def bert_position_ids(self, token_ids):
        return super().bert_position_ids(token_ids) + self.position_ids_offset

    # ------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask, tokentype_ids=None, lm_labels=None, output: str = "auto"):
        """input_ids, tokentype_ids: [b, s] ids; attention_mask: [b, s], 1 at
        tokens and 0 at padding. On the last pipeline stage, `output` "auto" gives
        - a classifier: class logits [b, num_classes];
        - with lm_labels [b, s]: (loss [b, s], correct [b, s] (1.0 where the
          argmax is the label), binary logits [b, 2] or None);
        - otherwise: (logits [b, s, vocab / TP], binary logits or None);
        "hidden": the final hidden states [b, s, h] (whole sequence on every TP rank).
        Other stages return the hidden states [s, b, h] for the next one."""
        extended_mask = self.bert_extended_attention_mask(attention_mask)
        embeddings = None
        if self.pre_process:
            if self.embedding.tokentype_embeddings is not None and tokentype_ids is None:
                tokentype_ids = torch.zeros_like(input_ids)
            elif self.embedding.tokentype_embeddings is None:
                tokentype_ids = None
            embeddings = self.embedding(input_ids=input_ids, position_ids=self.bert_position_ids(input_ids),
                                        tokentype_ids=tokentype_ids)
        hidden = self.encoder(hidden_states=embeddings, attention_mask=extended_mask)
        if not self.post_process:
            return hidden
        if output == "hidden":
            if self.config.sequence_parallel:
                hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            return hidden.transpose(0, 1).contiguous()
        if self.num_classes:
            pooled = self.classification_dropout(self.pooler(hidden, 0))
            return self.classification_head(pooled)
        binary_logits = self.binary_head(self.pooler(hidden, 0)) if self.binary_head is not None else None
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(self.lm_head(hidden_states=hidden), weight=weight)
        if lm_labels is None:
            return logits.transpose(0, 1).contiguous(), binary_logits
        loss = self.compute_language_model_loss(lm_labels, logits)
        with torch.no_grad():
            correct = (vocab_parallel_argmax(logits) == lm_labels.transpose(0, 1)).float().transpose(0, 1)
        return loss, correct, binary_logits


def _first_layer_post_ln(model: BertFamilyModel) -> bool:
    return len(model.encoder.layers) > 0 and isinstance(model.encoder.layers[0], PostLNTransformerLayer)


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global vocabulary ids of the largest logit, from vocabulary shards
    [..., vocab / TP] on each TP rank; ties go to the lowest id, as torch.argmax."""
    values, index = logits.max(dim=-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return index
    index = index + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = parallel_state.get_tensor_model_parallel_group()
    all_values = [torch.empty_like(values) for _ in range(tp)]
    all_index = [torch.empty_like(index) for _ in range(tp)]
    torch.distributed.all_gather(all_values, values.contiguous(), group=group)
    torch.distributed.all_gather(all_index, index.contiguous(), group=group)
    best = torch.stack(all_values).argmax(dim=0)  # the first (lowest-id) shard among equals
    return torch.stack(all_index).gather(0, best.unsqueeze(0)).squeeze(0)


def build_bert_model(args, config, pre_process=None, post_process=None, vp_stage=None) -> BertFamilyModel:
    """One model chunk for this rank's pipeline stage (or virtual stage)."""
    from megatron.training.bert.arguments import finalize_bert_args

    finalize_bert_args(args)
    if config.bias_activation_fusion:
        # add_bert_args turns --bias-gelu-fusion off: megatron-core's fused bias-GELU is the
        # tanh approximation (~1e-4 logit error), HF BERT models the exact (erf) GELU.
        raise ArgumentError("the fused bias-GELU (tanh approximation) is on: BERT models use the exact GELU; "
                            "add --no-bias-gelu-fusion")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    layers = args.num_layers // (args.pipeline_model_parallel_size * (args.virtual_pipeline_model_parallel_size or 1))
    return BertFamilyModel(
        config=config,
        transformer_layer_spec=build_bert_layer_spec(args, layers),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        num_tokentypes=args.num_tokentypes,
        add_binary_head=args.bert_binary_head,
        unpadded_vocab_size=getattr(args, "unpadded_vocab_size", None),
        position_ids_offset=args.position_ids_offset,
        num_classes=getattr(args, "num_classes", 0) or 0,
        classifier_dropout=args.hidden_dropout,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
