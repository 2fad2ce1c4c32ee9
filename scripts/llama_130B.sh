#!/bin/bash
# Pretrain a 130B Llama (72 layers, hidden 12288, 96 heads sharing 8 key/value
# groups, SwiGLU 39936, sequence 2048) on 8 nodes of 8 x A100-80GB: TP 8 inside
# a node, PP 8 across nodes (9 layers per stage), DP 1, micro-batch 2.
# Planned peak ~48 GiB per GPU (PLAN=1 bash scripts/llama_130B.sh).
#
#   export DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/models/llama2/tokenizer.model \
#          CHECKPOINT_PATH=/ckpt/llama-130b NNODES=8 NODE_RANK=0 MASTER_ADDR=node001
#   bash scripts/llama_130B.sh                     # on every node, with its NODE_RANK
#   sbatch --nodes 8 scripts/slurm/pretrain.sbatch scripts/llama_130B.sh
#   DRY_RUN=1 bash scripts/llama_130B.sh           # print the torchrun command
#   PLAN=1 bash scripts/llama_130B.sh              # memory per GPU and tokens/day, no GPU needed
# Extra flags are appended (and win): bash scripts/llama_130B.sh --micro-batch-size 1
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

require_paths
cluster_env 8
llama_data_args
logging_args 1000

MODEL_ARGS=(
  --num-layers 72 --hidden-size 12288 --ffn-hidden-size 39936
  --num-attention-heads 96 --group-query-attention --num-query-groups 8
  --seq-length 2048 --max-position-embeddings 2048
  "${LLAMA_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 8 --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce
)
TRAINING_ARGS=(
  --micro-batch-size 2 --global-batch-size 2048   # 4M tokens per step
  --train-iters 250000                            # 1T tokens
  --lr 1.5e-4 --min-lr 1.5e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  "${ADAMW_ARGS[@]}"
)
CHECKPOINT_ARGS=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 20)

launch_pretrain "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
