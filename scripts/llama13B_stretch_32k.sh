#!/bin/bash
# Extend a 13B Llama (Llama-2-13B's shape) from 4k to 32k context by position
# interpolation (rotary positions divided by 8): 1000 steps of 128 x 32k tokens
# from BASE_CHECKPOINT_PATH, without its optimizer state or RNG (--finetune).
# 4 nodes of 8 x A100-80GB: TP 8 with sequence parallelism, DP 4; no
# recomputation needed with flash attention (planned peak ~39 GiB per GPU).
#
#   export DATA_PATH=/data/long_text_document TOKENIZER_MODEL=/models/llama2/tokenizer.model \
#          BASE_CHECKPOINT_PATH=/ckpt/llama-13b CHECKPOINT_PATH=/ckpt/llama-13b-32k \
#          NNODES=4 NODE_RANK=0 MASTER_ADDR=node001
#   bash scripts/llama13B_stretch_32k.sh           # or: sbatch --nodes 4 scripts/slurm/pretrain.sbatch scripts/llama13B_stretch_32k.sh
#   PLAN=1 bash scripts/llama13B_stretch_32k.sh    # memory per GPU and tokens/day, no GPU needed
# A Hugging Face export of the result must divide its rotary positions by 8 as well.
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

require_paths
cluster_env 4
llama_data_args
logging_args 100
extension_checkpoint_args 250

MODEL_ARGS=(
  --num-layers 40 --hidden-size 5120 --ffn-hidden-size 13824 --num-attention-heads 40
  --seq-length 32768 --max-position-embeddings 32768 --rotary-seq-len-interpolation-factor 8
  "${LLAMA_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce
)
TRAINING_ARGS=(
  --micro-batch-size 1 --global-batch-size 128    # 4M tokens per step
  --train-iters 1000
  --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 30
  "${ADAMW_ARGS[@]}"
)

launch_pretrain "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
