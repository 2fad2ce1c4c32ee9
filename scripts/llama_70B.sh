#!/bin/bash
# Pretrain a 65B Llama (76 layers of Llama-2-70B's shape: hidden 8192, 64 heads
# sharing 8 key/value groups, SwiGLU 28672; sequence 2048) on 4 nodes of
# 8 x A100-80GB: TP 8 inside a node, PP 4 across nodes, DP 1, micro-batch 4.
# Planned peak ~54 GiB per GPU (PLAN=1 bash scripts/llama_70B.sh); on 8 nodes
# (NNODES=8, DP 2) the distributed optimizer halves the optimizer state.
#
#   export DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/models/llama2/tokenizer.model \
#          CHECKPOINT_PATH=/ckpt/llama-70b NNODES=4 NODE_RANK=0 MASTER_ADDR=node001
#   bash scripts/llama_70B.sh                      # on every node, with its NODE_RANK
#   sbatch --nodes 4 scripts/slurm/pretrain.sbatch scripts/llama_70B.sh
#   DRY_RUN=1 bash scripts/llama_70B.sh            # print the torchrun command
#   PLAN=1 bash scripts/llama_70B.sh               # memory per GPU and tokens/day, no GPU needed
# Extra flags are appended (and win): bash scripts/llama_70B.sh --micro-batch-size 2
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

require_paths
cluster_env 4
llama_data_args
logging_args 1000

MODEL_ARGS=(
  --num-layers 76 --hidden-size 8192 --ffn-hidden-size 28672
  --num-attention-heads 64 --group-query-attention --num-query-groups 8
  --seq-length 2048 --max-position-embeddings 2048
  "${LLAMA_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce
)
TRAINING_ARGS=(
  --micro-batch-size 4 --global-batch-size 2048   # 4M tokens per step
  --train-iters 250000                            # 1T tokens
  --lr 1.5e-4 --min-lr 1.5e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  "${ADAMW_ARGS[@]}"
)
CHECKPOINT_ARGS=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 20)

launch_pretrain "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
