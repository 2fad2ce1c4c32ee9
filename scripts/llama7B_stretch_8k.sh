#!/bin/bash
# Extend a 7B Llama (Llama-2-7B's shape) from 4k to 8k context by position
# interpolation (rotary positions divided by 2): 1000 steps of 128 x 8k tokens
# from BASE_CHECKPOINT_PATH, without its optimizer state or RNG (--finetune).
# One node of 8 x A100-80GB: TP 2 with sequence parallelism, DP 4 (planned
# peak ~45 GiB per GPU).
#
#   export DATA_PATH=/data/long_text_document TOKENIZER_MODEL=/models/llama2/tokenizer.model \
#          BASE_CHECKPOINT_PATH=/ckpt/llama-7b CHECKPOINT_PATH=/ckpt/llama-7b-8k \
#          NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/llama7B_stretch_8k.sh
#   PLAN=1 bash scripts/llama7B_stretch_8k.sh      # memory per GPU and tokens/day, no GPU needed
# A Hugging Face export of the result must divide its rotary positions by 2 as well.
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

require_paths
cluster_env 1
llama_data_args
logging_args 100
extension_checkpoint_args 200

MODEL_ARGS=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
  --seq-length 8192 --max-position-embeddings 8192 --rotary-seq-len-interpolation-factor 2
  "${LLAMA_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce
)
TRAINING_ARGS=(
  --micro-batch-size 1 --global-batch-size 128    # 1M tokens per step
  --train-iters 1000
  --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 30
  "${ADAMW_ARGS[@]}"
)

launch_pretrain "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
