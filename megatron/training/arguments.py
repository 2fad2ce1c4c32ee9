"""Command-line flags (Megatron-LM's names) parsed once into a namespace, then
turned into megatron-core's own typed configs.

    args = parse_args(argv)                  # flags -> argparse.Namespace, defaults filled in
    validate_args(args, world_size)          # layout checks whose messages name the fix
    transformer_config_from_args(args)       # -> megatron.core TransformerConfig
    optimizer_config_from_args(args)         # -> megatron.core OptimizerConfig
    ddp_config_from_args(args)               # -> megatron.core DistributedDataParallelConfig

Library code receives these objects as arguments; there is no global `get_args()`.
"""

import argparse
import os
import re
import sys
from typing import List, Optional, Tuple

import torch

from megatron.training.errors import ArgumentError, Parser
from megatron.training.sizes import default_ffn_hidden_size, divisors, tensor_parallel_sizes
from megatron.training.checkpoint.flags import (
    add_checkpoint_integrity_args, add_dist_ckpt_flags, validate_dist_ckpt_args,
)
from megatron.training.models.attention_backend import add_attention_flags, validate_attention_args


def _add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="default: 4 x hidden size; with --swiglu 8/3 x hidden size rounded down to 64")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None, help="default: hidden size / heads")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"], default="learned_absolute")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="same as --position-embedding-type rope")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="linear position interpolation: rotary positions are divided by this factor")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x rope frequency scaling (low_freq_factor 1, high_freq_factor 4, original context "
                        "8192), by --rope-scaling-factor")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="with --use-rope-scaling (Llama 3.1: 8)")
    g.add_argument("--add-qkv-bias", action="store_true", help="biases on the q/k/v projections only (Qwen2)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalise queries and keys per head before rotary embedding (Qwen3)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--layernorm-epsilon", type=float, dest="norm_epsilon")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--apply-query-key-layer-scaling", action="store_true")
    g.add_argument("--attention-softmax-in-fp32", action="store_true")
    add_attention_flags(g)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when it imports, else local")
    g.add_argument("--use-mcore-models", action="store_true", help="accepted for script compatibility (always on)")


def _add_training_flags(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) when iteration %% N == 0")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-activations", action="store_true", help="same as --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--use-cpu-initialization", action="store_true", help="default on machines without CUDA")

    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="on resume, use this run's LR schedule flags instead of the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", action="store_true",
                   dest="use_checkpoint_opt_param_scheduler",
                   help="on resume, continue the checkpoint's LR schedule whatever this run's flags say")

    g = p.add_argument_group("mixed precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale (fp16); default: dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")


def _add_parallel_flags(p):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank")


def _add_data_flags(p):
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None, help="a prefix, or a blend: weight1 prefix1 weight2 prefix2 ...")
    g.add_argument("--split", type=str, default="969, 30, 1")
    g.add_argument("--mock-data", action="store_true", help="random tokens; no files needed")
    g.add_argument("--data-cache-path", type=str, default=None)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--tokenizer-type", type=str, default=None)
    g.add_argument("--tokenizer-model", type=str, default=None)
    g.add_argument("--vocab-file", type=str, default=None)
    g.add_argument("--merge-file", type=str, default=None)
    g.add_argument("--vocab-size", type=int, default=None)


def _add_checkpoint_flags(p):
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--load", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; start at iteration 0 without optimizer or RNG state")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's shape from the checkpoint being loaded")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default=None,
                   help="torch_dist (default, as Megatron-LM): megatron-core's distributed checkpoint, loadable "
                        "under any TP/PP/DP layout; torch: the per-rank iter_XXXXXXX/mp_rank_TT[_PPP]/"
                        "model_optim_rng.pt layout (the default with adapters, --lora-rank). --load reads either")


def _add_logging_flags(p):
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--log-throughput", action="store_true")
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--log-timers-to-tensorboard", action="store_true")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--skip-train", action="store_true")


def build_parser(extra_args_provider=None) -> Parser:
    from megatron.training.exit_signal import add_exit_signal_args
    from megatron.training.kernels.flags import add_kernel_flags
    from megatron.training.peft.arguments import add_adapter_flags

    p = Parser(description="Megatron-style Llama pretraining on megatron-core")
    for add in (_add_model_flags, add_kernel_flags, _add_training_flags, _add_parallel_flags, _add_data_flags,
                _add_checkpoint_flags, add_dist_ckpt_flags, _add_logging_flags, add_checkpoint_integrity_args,
                add_exit_signal_args, add_adapter_flags):
        add(p)
    # Sequences of --seq-length each sample carries (not a flag): the pipeline schedule's micro-batch is
    # --micro-batch-size x this many sequences (preference tuning: a chosen and a rejected one, and their
    # reference pass; preference/arguments.py sets it); of those, the ones trained on (forward and
    # backward), the rest being forward-only reference passes (the log's tokens/s and TFLOP/s count both).
    p.set_defaults(sequences_per_sample=1, trained_sequences_per_sample=1)
    if extra_args_provider is not None:
        extra_args_provider(p)
    return p


def parse_args(argv: Optional[List[str]] = None, extra_args_provider=None) -> argparse.Namespace:
    """Parse flags and fill in the defaults that depend on other flags."""
    args = build_parser(extra_args_provider).parse_args(sys.argv[1:] if argv is None else argv)
    _fill_derived(args)
    return args


def flags_given(argv: List[str], extra_args_provider=None) -> set:
    """The dests of the flags `argv` names itself (parser defaults do not count)."""
    parser = build_parser(extra_args_provider)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(list(argv))
    return set(vars(given))



def _fill_derived(args) -> None:
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if not args.add_position_embedding and args.position_embedding_type == "learned_absolute":
        args.position_embedding_type = "none"
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = default_ffn_hidden_size(args.hidden_size, args.swiglu)
    if args.kv_channels is None and args.hidden_size and args.num_attention_heads:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    args.params_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.transformer_impl is None:
        from megatron.training.peft.arguments import adapters_enabled

        # Adapters (--lora-rank) wrap megatron-core's local linears: that spec, whatever is installed.
        local = adapters_enabled(args) or not _transformer_engine_available()
        args.transformer_impl = "local" if local else "transformer_engine"
    if not torch.cuda.is_available():
        args.use_cpu_initialization = True


def _transformer_engine_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None




def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)


def _fail(message: str) -> None:
    raise ArgumentError(message)


def validate_args(args, world_size: int) -> None:
    """Check flags and the parallel layout before anything heavy happens.
    Sets args.world_size, args.data_parallel_size, args.global_batch_size,
    args.num_microbatches, args.virtual_pipeline_model_parallel_size."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        _check(getattr(args, flag) is not None, f"--{flag.replace('_', '-')} is required")
    if args.skip_train and args.lr is None:
        args.lr = 0.0  # nothing is trained (scoring a checkpoint): the optimizer is built, never stepped
    _check(args.lr is not None, "--lr is required (the peak learning rate)")
    _check((args.train_iters is None) != (args.train_samples is None),
           "give exactly one of --train-iters and --train-samples")
    _check(not (args.bf16 and args.fp16), "--bf16 and --fp16 are exclusive: choose one")

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _check(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    _check(world_size % (tp * pp) == 0,
           f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}: "
           f"launch a multiple of {tp * pp} processes, or choose TP x PP dividing {world_size} "
           f"({divisors(world_size)})")
    dp = world_size // (tp * pp)

    heads, groups, ffn = args.num_attention_heads, args.num_query_groups, args.ffn_hidden_size
    _check(args.hidden_size % heads == 0 or args.kv_channels is not None,
           f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}: set --kv-channels")
    _check(heads % groups == 0,
           f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}: "
           f"use a number of query groups dividing {heads} ({divisors(heads)})")
    # Every TP rank holds whole query groups (so whole heads) and an equal slice of the MLP.
    if groups % tp or ffn % tp:
        if groups % tp == 0:
            what = f"--ffn-hidden-size {ffn}"
        elif groups == heads:
            what = f"--num-attention-heads {heads}"
        else:
            what = f"num_query_groups={groups} (of {heads} attention heads)"
        raise ArgumentError(f"{what} is not divisible by --tensor-model-parallel-size {tp}: use a TP size that divides "
                            f"the heads, query groups and FFN size ({tensor_parallel_sizes(heads, groups, ffn)})")

    _check(args.num_layers % pp == 0,
           f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}: "
           f"use a PP size that divides {args.num_layers} ({divisors(args.num_layers)})")
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // pp
        v = args.num_layers_per_virtual_pipeline_stage
        _check(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _check(per_stage % v == 0,
               f"{per_stage} layers per pipeline stage (--num-layers {args.num_layers} / PP {pp}) are not divisible "
               f"by --num-layers-per-virtual-pipeline-stage {v}: use one of {divisors(per_stage)}")
        _check(per_stage // v > 1, f"--num-layers-per-virtual-pipeline-stage {v} gives one virtual stage: "
               f"use a smaller value (a divisor of {per_stage} below {per_stage}) or drop the flag")
        args.virtual_pipeline_model_parallel_size = per_stage // v

    _check(not args.sequence_parallel or tp > 1,
           "--sequence-parallel needs --tensor-model-parallel-size > 1: drop the flag or raise TP")
    if args.sequence_parallel:
        _check(args.seq_length % tp == 0,
               f"--seq-length {args.seq_length} is not divisible by TP {tp}, which --sequence-parallel needs")
    if args.position_embedding_type == "learned_absolute" or args.max_position_embeddings:
        _check(args.max_position_embeddings is None or args.seq_length <= args.max_position_embeddings
               or args.position_embedding_type == "rope",
               f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}: "
               "raise --max-position-embeddings or shorten --seq-length")
    if args.rotary_seq_len_interpolation_factor is not None:
        _check(args.position_embedding_type == "rope",
               "--rotary-seq-len-interpolation-factor needs rotary embeddings: add --use-rotary-position-embeddings")
        _check(args.rotary_seq_len_interpolation_factor >= 1.0,
               "--rotary-seq-len-interpolation-factor must be >= 1 (positions are divided by it)")
    if args.use_rope_scaling:
        _check(args.position_embedding_type == "rope",
               "--use-rope-scaling needs rotary embeddings: add --use-rotary-position-embeddings")
        _check(args.rope_scaling_factor >= 1.0, "--rope-scaling-factor must be >= 1 (low frequencies are divided "
               "by it; Llama 3.1 uses 8)")

    mbs = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    _check(args.global_batch_size % (mbs * dp) == 0,
           f"--global-batch-size {args.global_batch_size} is not divisible by micro batch x data-parallel size = "
           f"{mbs} x {dp} = {mbs * dp}: use a global batch that is a multiple of {mbs * dp}")
    args.num_microbatches = args.global_batch_size // (mbs * dp)
    _, warmup, decay = lr_schedule_samples(args)
    train_iters = args.train_iters if args.train_iters is not None else args.train_samples // args.global_batch_size
    # With no training step at all (an initial checkpoint) the schedule is never used.
    _check(warmup < decay or not train_iters,
           f"the LR warm-up ({warmup} samples) is not shorter than the LR decay ({decay} samples): "
           "shorten --lr-warmup-iters/--lr-warmup-samples or lengthen --lr-decay-iters/--train-iters")
    if args.virtual_pipeline_model_parallel_size is not None:
        _check(args.num_microbatches % pp == 0,
               f"interleaved pipelining needs the number of micro-batches ({args.num_microbatches}) to be a "
               f"multiple of PP {pp}: raise --global-batch-size to a multiple of {mbs * dp * pp}")

    if args.overlap_param_gather:
        _check(args.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer")
    _check(args.recompute_method is None or args.recompute_granularity == "full",
           "--recompute-method applies to --recompute-granularity full only")
    if args.recompute_granularity == "full":
        _check(args.recompute_method is not None and args.recompute_num_layers is not None,
               "--recompute-granularity full needs --recompute-method (uniform|block) and --recompute-num-layers N")
    if args.finetune:
        _check(args.load is not None, "--finetune needs --load DIR (the checkpoint to start from)")
    if args.use_checkpoint_args:
        _check(args.load is not None, "--use-checkpoint-args needs --load DIR")
    _check(args.mock_data or args.data_path or args.skip_train,
           "no training data: give --data-path PREFIX (or a blend: W1 P1 W2 P2 ...) or --mock-data")
    if args.data_path and len(args.data_path) > 1:
        _check(len(args.data_path) % 2 == 0,
               "--data-path with several datasets takes weight/prefix pairs: W1 PREFIX1 W2 PREFIX2 ...")
    if args.tokenizer_type is None:
        _check(args.mock_data and args.vocab_size is not None,
               "--tokenizer-type is required (Llama2Tokenizer, HuggingFaceTokenizer, NullTokenizer, ...); "
               "with --mock-data, --vocab-size N alone is enough")

    from megatron.training.peft.arguments import validate_adapter_args

    validate_adapter_args(args, _fail)
    validate_dist_ckpt_args(args)
    validate_attention_args(args, _fail)

    args.world_size = world_size
    args.data_parallel_size = dp


def lr_schedule_samples(args) -> Tuple[int, int, int]:
    """(training, LR warm-up, LR decay) lengths in samples, from the flags and
    the global batch size: the decay runs --lr-decay-samples, else
    --lr-decay-iters, else the whole training; the warm-up is
    --lr-warmup-fraction of the decay, else --lr-warmup-samples/-iters."""
    gbs = args.global_batch_size
    train = args.train_samples if args.train_samples is not None else args.train_iters * gbs
    decay = args.lr_decay_samples or (args.lr_decay_iters * gbs if args.lr_decay_iters else train)
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    else:
        warmup = args.lr_warmup_samples or args.lr_warmup_iters * gbs
    return train, warmup, decay



def transformer_config_from_args(args):
    """megatron-core's TransformerConfig for a Llama-family GPT model."""
    try:
        return _transformer_config(args)
    except (ValueError, AssertionError) as e:
        # megatron-core's own checks of flag combinations validate_args does not
        # make; its message names config fields, which are our flags' dests.
        flags = [f"--{dest.replace('_', '-')}" for dest in sorted(vars(args)) if re.search(rf"\b{dest}\b", str(e))]
        raise ArgumentError(f"megatron-core's TransformerConfig rejects these flags: {str(e).rstrip('.')}"
                            + (f" (change {', '.join(flags)})" if flags else "")) from None


def _transformer_config(args):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    from megatron.training import kernels

    swiglu_or_gelu = torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        layernorm_epsilon=args.norm_epsilon,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=swiglu_or_gelu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        init_method_std=args.init_method_std,
        apply_query_key_layer_scaling=args.apply_query_key_layer_scaling,
        attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        microbatch_group_size_per_vp_stage=(
            args.pipeline_model_parallel_size if args.virtual_pipeline_model_parallel_size else None),
        sequence_parallel=args.sequence_parallel,
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu_initialization=args.use_cpu_initialization,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        **kernels.transformer_config_fields(args),
        # Transformer Engine's spec only: megatron-core turns the value into TE's NVTE_*_ATTN switches,
        # once per process; the local spec's choice is a layer-spec module (models/attention_backend.py).
        **({"attention_backend": AttnBackend[args.attention_backend]}
           if args.transformer_impl == "transformer_engine" else {}),
        deallocate_pipeline_outputs=True,
        # megatron-core 0.16.1's default "full" warns that it is deprecated at every
        # start-up; [] is its new spelling of the same (CUDA graphs are off anyway).
        cuda_graph_scope=[],
        # With gloo, batched isend/irecv may pair two messages between the same two
        # ranks in the wrong order (interleaved PP=2: the next and previous stage
        # are one rank), silently swapping activations and gradients of equal
        # shape; the per-message path orders them. NCCL keeps megatron's default.
        batch_p2p_comm=args.distributed_backend == "nccl",
    )


def optimizer_config_from_args(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=args.params_dtype,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )


def ddp_config_from_args(args):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32 or args.params_dtype == torch.float32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )



def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
