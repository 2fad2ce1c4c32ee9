#!/bin/bash
# Pretrain BERT-base (12 layers, hidden 768, 12 heads, FFN 3072, sequence 512,
# post-LN, masked LM + sentence-order prediction) on 1 node of 8 GPUs: DP 8.
# The result exports to BertForPreTraining (tools/checkpoint/util.py --model-type BERT --saver hf).
# Continue pretraining bert-base-uncased (FinLlama's PLM recipe) by converting it first:
#   python tools/checkpoint/util.py --model-type BERT --loader hf --saver megatron \
#       --load-dir bert-base-uncased --save-dir ckpt/bert-base-mg
#   export BASE_CHECKPOINT_PATH=ckpt/bert-base-mg TOKENIZER_MODEL=bert-base-uncased
#
#   export DATA_PATH=/data/fin_text_sentence VOCAB_FILE=/models/bert/vocab.txt \
#          CHECKPOINT_PATH=/ckpt/bert-base NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/bert_base.sh
#   DRY_RUN=1 bash scripts/bert_base.sh            # print the torchrun command
# Extra flags are appended (and win): bash scripts/bert_base.sh --bert-no-binary-head
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bert.sh"

bert_data_args
bert_tokenizer_args "bert-base-uncased"
cluster_env 1
logging_args 2000
bert_checkpoint_args 2000

MODEL_ARGS=(
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12
  --seq-length 512 --max-position-embeddings 512 --norm-epsilon 1e-12
  "${POST_LN_ARGS[@]}"
)
MASKING_ARGS=(--mask-prob 0.15 --short-seq-prob 0.1 --masking-max-ngram 3)
TRAINING_ARGS=(
  --micro-batch-size 32 --global-batch-size 256   # 131k tokens per step
  --train-iters 1000000
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style linear --lr-warmup-iters 10000
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-6 --weight-decay 0.01 --clip-grad 1.0
)

launch_torchrun pretrain_bert.py "${MODEL_ARGS[@]}" "${MASKING_ARGS[@]}" "${BERT_PRECISION_ARGS[@]}" \
  "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
