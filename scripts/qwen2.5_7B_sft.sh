#!/bin/bash
# Supervised fine-tuning of Qwen2.5-7B or -7B-Instruct (config.json: hidden 3584, 28 layers, 28 heads
# sharing 4 key/value groups, SwiGLU 18944, biases on q/k/v, untied embeddings of 152,064 rows for a
# tokenizer of 151,665 tokens, rope theta 1000000) on one node of 8 x A100 or H100 (80 GB): all
# weights trained, TP 2 with sequence parallelism, DP 4 with the distributed optimizer, 64 packed
# samples of 8k tokens per step (0.5M tokens). Planned: 51.2 GiB per GPU; 2.06B tokens/day on
# 8 x A100, 6.54B on 8 x H100 at 50% MFU (PLAN=1 bash scripts/qwen2.5_7B_sft.sh; PLAN_ARGS="--gpu H100").
# TP must divide the 4 key/value groups: 1, 2 or 4.
#
#   python tools/checkpoint/util.py --model-type GPT --loader hf --saver torch_dist \
#       --load-dir /models/Qwen2.5-7B-Instruct --save-dir /ckpt/qwen2.5-7b
#   python tools/preprocess_sft_data.py --input data/train.jsonl --output-prefix /data/sft/train --workers 8 \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Qwen2.5-7B-Instruct   # its chat template
#   export DATA_PATH=/data/sft/train VALID_DATA_PATH=/data/sft/valid TOKENIZER_MODEL=/models/Qwen2.5-7B-Instruct \
#          BASE_CHECKPOINT_PATH=/ckpt/qwen2.5-7b CHECKPOINT_PATH=/ckpt/qwen2.5-7b-sft \
#          NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/qwen2.5_7B_sft.sh
#   PLAN=1 bash scripts/qwen2.5_7B_sft.sh          # memory per GPU and tokens/day, no GPU needed
# --use-checkpoint-args keeps the checkpoint's 152,064 embedding rows (more than the tokenizer's tokens).
# Extra flags are appended (and win), e.g. --train-iters for your data: examples x epochs / 64 (packed: fewer).
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

sft_data_args
cluster_env 1
logging_args 100
extension_checkpoint_args 200
PLAN_VOCAB_SIZE=${PLAN_VOCAB_SIZE:-152064}

MODEL_ARGS=(
  --num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944
  --num-attention-heads 28 --group-query-attention --num-query-groups 4
  --seq-length 8192 --max-position-embeddings 131072
  "${QWEN2_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce
)
TRAINING_ARGS=(
  --micro-batch-size 1 --global-batch-size 64     # 0.5M tokens per step
  --train-iters 1000
  --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 30
  "${ADAMW_ARGS[@]}"
)
CHECKPOINT_ARGS+=(--use-checkpoint-args)

launch_finetune "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
