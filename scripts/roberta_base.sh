#!/bin/bash
# Pretrain RoBERTa-base (12 layers, hidden 768, 12 heads, FFN 3072, sequence 512,
# post-LN, masked LM only, positions from padding_idx + 1 = 2, one token type,
# byte-level BPE) on 1 node of 8 GPUs: DP 8. RoBERTa masks single tokens
# (run_mlm.py's way). Exports to RobertaForMaskedLM.
# DISTILROBERTA=1 (or scripts/distilroberta.sh) builds the 6-layer DistilRoBERTa shape.
# Continue pretraining roberta-base: convert it (tools/checkpoint/util.py --model-type BERT
# --loader hf --saver megatron) and export BASE_CHECKPOINT_PATH=that directory.
#
#   export DATA_PATH=/data/fin_text_sentence TOKENIZER_MODEL=/models/roberta-base \
#          CHECKPOINT_PATH=/ckpt/roberta-base NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/roberta_base.sh
#   DRY_RUN=1 bash scripts/roberta_base.sh         # print the torchrun command
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bert.sh"

bert_data_args
bert_tokenizer_args "roberta-base (its tokenizer directory)"
cluster_env 1
logging_args 2000
bert_checkpoint_args 2000

MODEL_ARGS=(
  --num-layers "$([[ "${DISTILROBERTA:-0}" == 1 ]] && echo 6 || echo 12)"
  --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12
  --seq-length 512 --max-position-embeddings 514 --position-ids-offset 2 --num-tokentypes 1
  --bert-no-binary-head --norm-epsilon 1e-5
  "${POST_LN_ARGS[@]}"
)
MASKING_ARGS=(--mask-prob 0.15 --short-seq-prob 0.1 --masking-max-ngram 1 --no-whole-word-masking)
TRAINING_ARGS=(
  --micro-batch-size 32 --global-batch-size 2048  # 1M tokens per step (RoBERTa trains with 8k sequences)
  --train-iters 500000
  --lr 6e-4 --min-lr 0 --lr-decay-style linear --lr-warmup-iters 24000
  --adam-beta1 0.9 --adam-beta2 0.98 --adam-eps 1e-6 --weight-decay 0.01 --clip-grad 1.0
)

launch_torchrun pretrain_bert.py "${MODEL_ARGS[@]}" "${MASKING_ARGS[@]}" "${BERT_PRECISION_ARGS[@]}" \
  "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
