#!/bin/bash
# LoRA fine-tuning of Llama-3.1-70B or -70B-Instruct (config.json: hidden 8192, 80 layers, 64 heads
# sharing 8 key/value groups, SwiGLU 28672, vocabulary 128,256, rope theta 500000 with Llama 3.1's
# scaling by 8) on one node of 8 x A100 or H100 (80 GB): the bf16 base frozen, rank-16 adapters on
# every linear layer (q k v o gate up down, alpha 32), TP 8 with sequence parallelism, 64 packed
# samples of 8k tokens per step (0.5M tokens). Planned: 57.3 GiB per GPU; 0.224B tokens/day on
# 8 x A100, 0.710B on 8 x H100 at 50% MFU, counting full fine-tuning's FLOPs (a frozen base skips its
# weight gradients, so this is a floor) (PLAN=1 bash scripts/llama3.1_70B_lora.sh; PLAN_ARGS="--gpu H100").
# Checkpoints hold the adapters and name their base; tools/checkpoint/util.py --saver peft exports
# them for PeftModel and vLLM.
#
#   python tools/checkpoint/util.py --model-type GPT --loader hf --saver torch_dist \
#       --load-dir /models/Llama-3.1-70B-Instruct --save-dir /ckpt/llama3.1-70b
#   python tools/preprocess_sft_data.py --input data/train.jsonl --output-prefix /data/sft/train --workers 8 \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Llama-3.1-70B-Instruct   # its chat template
#   export DATA_PATH=/data/sft/train VALID_DATA_PATH=/data/sft/valid TOKENIZER_MODEL=/models/Llama-3.1-70B-Instruct \
#          BASE_CHECKPOINT_PATH=/ckpt/llama3.1-70b CHECKPOINT_PATH=/ckpt/llama3.1-70b-lora \
#          NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/llama3.1_70B_lora.sh
#   PLAN=1 bash scripts/llama3.1_70B_lora.sh       # memory per GPU and tokens/day, no GPU needed
# Extra flags are appended (and win), e.g. --lora-quant-bits 4 (QLoRA) or --train-iters for your data.
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

sft_data_args
cluster_env 1
logging_args 100
extension_checkpoint_args 200
PLAN_VOCAB_SIZE=${PLAN_VOCAB_SIZE:-128256}

MODEL_ARGS=(
  --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
  --num-attention-heads 64 --group-query-attention --num-query-groups 8
  --seq-length 8192 --max-position-embeddings 131072
  "${LLAMA3_ARGS[@]}"
)
ADAPTER_ARGS=(
  --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05
  --lora-target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --sequence-parallel
)
TRAINING_ARGS=(
  --micro-batch-size 1 --global-batch-size 64     # 0.5M tokens per step
  --train-iters 1000
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 30
  "${ADAMW_ARGS[@]}"
)
CHECKPOINT_ARGS+=(--use-checkpoint-args)

launch_finetune "${MODEL_ARGS[@]}" "${ADAPTER_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" \
  "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
