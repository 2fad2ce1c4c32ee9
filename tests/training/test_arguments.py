"""Flags keep Megatron-LM's names; bad flags and bad layouts fail early with a fix."""

import pytest

from megatron.training.arguments import (ArgumentError, build_parser, parse_args, transformer_config_from_args,
                                         validate_args)

BASE = ["--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "10",
        "--mock-data", "--vocab-size", "128"]

# Flags existing launch scripts use; renaming any of them breaks those scripts.
MEGATRON_FLAGS = """--tensor-model-parallel-size --pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage
--sequence-parallel --num-layers --hidden-size --ffn-hidden-size --num-attention-heads --group-query-attention
--num-query-groups --seq-length --max-position-embeddings --micro-batch-size --global-batch-size --lr --min-lr
--lr-decay-style --lr-warmup-iters --lr-warmup-samples --lr-decay-iters --lr-decay-samples --train-iters
--train-samples --weight-decay --clip-grad --adam-beta1 --adam-beta2 --adam-eps --optimizer --sgd-momentum --bf16
--fp16 --initial-loss-scale --loss-scale --seed --untie-embeddings-and-output-weights --disable-bias-linear
--no-position-embedding --use-rotary-position-embeddings --position-embedding-type --rotary-base --rotary-percent
--rotary-seq-len-interpolation-factor --normalization --norm-epsilon --swiglu --no-masked-softmax-fusion
--attention-softmax-in-fp32 --use-flash-attn --attention-dropout --hidden-dropout --make-vocab-size-divisible-by
--recompute-activations --recompute-granularity --recompute-method --recompute-num-layers
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --distributed-backend --data-path --split
--mock-data --tokenizer-type --tokenizer-model --vocab-size --vocab-file --merge-file --save --load --save-interval
--no-save-optim --no-save-rng --no-load-optim --no-load-rng --finetune --use-checkpoint-args
--exit-on-missing-checkpoint --log-interval --log-throughput --tensorboard-dir --eval-interval --eval-iters
--exit-interval --no-bias-swiglu-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion
--no-persist-layer-norm --no-gradient-accumulation-fusion --cross-entropy-loss-fusion
--cross-entropy-fusion-impl --ckpt-format --async-save --use-persistent-ckpt-worker --ckpt-fully-parallel-save
--no-ckpt-fully-parallel-save --ckpt-fully-parallel-load --dist-ckpt-optim-fully-reshardable
--distrib-optim-fully-reshardable-mem-efficient --auto-detect-ckpt-format --use-rope-scaling --rope-scaling-factor
--add-qkv-bias --qk-layernorm --kv-channels""".split()


def check(argv, world_size=1):
    args = parse_args(BASE + argv)
    validate_args(args, world_size)
    return args


def test_every_megatron_flag_is_accepted():
    known = set(build_parser().known_flags())
    missing = [f for f in MEGATRON_FLAGS if f not in known]
    assert not missing, f"flags launch scripts rely on are gone: {missing}"


def test_unknown_flag_names_the_nearest_known_ones():
    with pytest.raises(ArgumentError, match=r"unknown flag --tensor-model-paralel-size; did you mean "
                                            r"--tensor-model-parallel-size"):
        parse_args(BASE + ["--tensor-model-paralel-size", "2"])


def test_prefixes_are_not_silently_accepted():
    with pytest.raises(ArgumentError, match="unknown flag --tensor-model"):
        parse_args(BASE + ["--tensor-model", "2"])


def test_derived_defaults():
    args = check(["--group-query-attention", "--num-query-groups", "2", "--use-rotary-position-embeddings",
                  "--swiglu"], world_size=4)
    assert args.ffn_hidden_size == 128 and args.kv_channels == 8  # SwiGLU: int(8 * 64 / 3 / 64) * 64
    assert args.position_embedding_type == "rope"
    assert args.data_parallel_size == 4 and args.global_batch_size == 8 and args.num_microbatches == 1
    config = transformer_config_from_args(args)
    assert config.num_query_groups == 2 and config.gated_linear_unit
    assert not (config.add_qkv_bias or config.qk_layernorm or args.use_rope_scaling) and args.rope_scaling_factor == 8
    config = transformer_config_from_args(check(["--add-qkv-bias", "--qk-layernorm", "--disable-bias-linear"]))
    assert config.add_qkv_bias and config.qk_layernorm and not config.add_bias_linear


@pytest.mark.parametrize("argv, world_size, message", [
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     r"world size 6 is not divisible by TP x PP = 2 x 2 = 4: launch a multiple of 4 processes"),
    (["--tensor-model-parallel-size", "3"], 3,
     r"--num-attention-heads 8 is not divisible by --tensor-model-parallel-size 3: use a TP size that divides the "
     r"heads, query groups and FFN size \(1, 2, 4, 8\)"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     r"num_query_groups=2 \(of 8 attention heads\) is not divisible by --tensor-model-parallel-size 4: use a TP size "
     r"that divides the heads, query groups and FFN size \(1, 2\)$"),
    # 9 heads in 3 groups at TP=2: the advice lists the sizes that divide both, not 9's divisors
    (["--num-attention-heads", "9", "--hidden-size", "72", "--group-query-attention", "--num-query-groups", "3",
      "--tensor-model-parallel-size", "2"], 2, r"num_query_groups=3 \(of 9 attention heads\) .*\(1, 3\)$"),
    (["--ffn-hidden-size", "100", "--tensor-model-parallel-size", "8"], 8,
     r"--ffn-hidden-size 100 is not divisible by --tensor-model-parallel-size 8: .* \(1, 2, 4\)$"),
    (["--pipeline-model-parallel-size", "3"], 3,
     r"--num-layers 8 is not divisible by --pipeline-model-parallel-size 3: use a PP size that divides 8"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     r"4 layers per pipeline stage .* are not divisible by --num-layers-per-virtual-pipeline-stage 3"),
    (["--global-batch-size", "10"], 4,
     r"--global-batch-size 10 is not divisible by micro batch x data-parallel size = 2 x 4 = 8"),
    (["--sequence-parallel"], 1, r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--seq-length", "64"], 1, r"--seq-length 64 exceeds --max-position-embeddings 32"),
    (["--rotary-seq-len-interpolation-factor", "2"], 1, r"needs rotary embeddings: add --use-rotary-position"),
    (["--use-rope-scaling"], 1, r"--use-rope-scaling needs rotary embeddings: add --use-rotary-position"),
    (["--use-rope-scaling", "--rope-scaling-factor", "0.5", "--use-rotary-position-embeddings"], 1,
     r"--rope-scaling-factor must be >= 1"),
    (["--bf16", "--fp16"], 1, r"--bf16 and --fp16 are exclusive"),
    (["--lr-warmup-iters", "10"], 1,
     r"the LR warm-up \(20 samples\) is not shorter than the LR decay \(20 samples\): shorten --lr-warmup-iters"),
    (["--train-samples", "100"], 1, r"exactly one of --train-iters and --train-samples"),
])
def test_bad_layouts_name_the_fix(argv, world_size, message):
    with pytest.raises(ArgumentError, match=message):
        check(argv, world_size)


def test_warm_up_longer_than_decay_is_allowed_without_training_steps():
    """--train-iters 0 (writing an initial checkpoint) never uses the LR schedule."""
    check(["--lr-warmup-iters", "10", "--train-iters", "0"])


def test_no_data_is_an_error():
    args = parse_args([a for a in BASE if a != "--mock-data"])
    with pytest.raises(ArgumentError, match="give --data-path PREFIX"):
        validate_args(args, 1)


def test_megatron_core_config_checks_are_one_line_naming_the_flags():
    """A combination only megatron-core's TransformerConfig checks: its ValueError becomes an
    ArgumentError that names our flags, not a traceback."""
    args = check(["--recompute-granularity", "selective", "--recompute-num-layers", "2"])
    with pytest.raises(ArgumentError, match=r"TransformerConfig rejects these flags: .*recompute_num_layers must be "
                                            r"None \(change --recompute-granularity, --recompute-num-layers\)$"):
        transformer_config_from_args(args)
