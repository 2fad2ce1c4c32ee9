#!/bin/bash
# Supervised fine-tuning of Llama-3.1-8B or -8B-Instruct (config.json: hidden 4096, 32 layers,
# 32 heads sharing 8 key/value groups, SwiGLU 14336, vocabulary 128,256, rope theta 500000 with
# Llama 3.1's scaling by 8) on one node of 8 x A100 or H100 (80 GB): all weights trained, TP 2 with
# sequence parallelism, DP 4 with the distributed optimizer, 64 packed samples of 8k tokens per step
# (0.5M tokens). Planned: 52.7 GiB per GPU; 1.86B tokens/day on 8 x A100, 5.90B on 8 x H100 at 50% MFU
# (PLAN=1 bash scripts/llama3.1_8B_sft.sh; PLAN_ARGS="--gpu H100").
#
#   python tools/checkpoint/util.py --model-type GPT --loader hf --saver torch_dist \
#       --load-dir /models/Llama-3.1-8B-Instruct --save-dir /ckpt/llama3.1-8b
#   python tools/preprocess_sft_data.py --input data/train.jsonl --output-prefix /data/sft/train --workers 8 \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Llama-3.1-8B-Instruct   # its chat template
#   export DATA_PATH=/data/sft/train VALID_DATA_PATH=/data/sft/valid TOKENIZER_MODEL=/models/Llama-3.1-8B-Instruct \
#          BASE_CHECKPOINT_PATH=/ckpt/llama3.1-8b CHECKPOINT_PATH=/ckpt/llama3.1-8b-sft \
#          NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/llama3.1_8B_sft.sh
#   PLAN=1 bash scripts/llama3.1_8B_sft.sh         # memory per GPU and tokens/day, no GPU needed
# Extra flags are appended (and win), e.g. --train-iters for your data: examples x epochs / 64 (packed: fewer).
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

sft_data_args
cluster_env 1
logging_args 100
extension_checkpoint_args 200
PLAN_VOCAB_SIZE=${PLAN_VOCAB_SIZE:-128256}

MODEL_ARGS=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
  --num-attention-heads 32 --group-query-attention --num-query-groups 8
  --seq-length 8192 --max-position-embeddings 131072
  "${LLAMA3_ARGS[@]}"
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
