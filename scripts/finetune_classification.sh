#!/bin/bash
# Fine-tune a pretrained BERT-family checkpoint (any of scripts/bert_base.sh,
# roberta_base.sh, distilroberta.sh, or a converted HF model) for sentence
# classification, e.g. financial sentiment (Financial PhraseBank, FinGPT's
# sentiment sets): 3 epochs, accuracy and macro-F1 on VALID_DATA after each,
# on 1 node of GPUS_PER_NODE GPUs (data parallel). Export the result with
#   python tools/checkpoint/util.py --model-type BERT --loader megatron --saver hf \
#       --load-dir $CHECKPOINT_PATH --save-dir cls-hf     # a *ForSequenceClassification
#
#   export PRETRAINED_CHECKPOINT=/ckpt/bert-base TRAIN_DATA=fpb_train.jsonl VALID_DATA=fpb_test.jsonl \
#          VOCAB_FILE=/models/bert/vocab.txt CHECKPOINT_PATH=/ckpt/bert-fpb NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/finetune_classification.sh
# Records: {"text"[, "text_b"], "label"} or FinGPT's {"instruction", "input", "output"}.
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bert.sh"

require PRETRAINED_CHECKPOINT \
  "DIR (a checkpoint of pretrain_bert.py, or an HF model converted with tools/checkpoint/util.py)"
require TRAIN_DATA "FILE (jsonl of {\"text\", \"label\"} records)"
require VALID_DATA "FILE (held-out jsonl, scored after every epoch)"
require CHECKPOINT_PATH "DIR (the fine-tuned checkpoint is written here)"
bert_tokenizer_args "the pretrained model's tokenizer directory"
cluster_env 1

if [[ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]]; then
  START_ARGS=(--load "$CHECKPOINT_PATH" --use-checkpoint-args)
else
  START_ARGS=(--load "$PRETRAINED_CHECKPOINT" --finetune --use-checkpoint-args --exit-on-missing-checkpoint)
fi
TASK_ARGS=(
  --train-data "$TRAIN_DATA" --valid-data "$VALID_DATA" --epochs 3 --seq-length 128
  --micro-batch-size 32 --lr 2e-5 --lr-decay-style linear --lr-warmup-fraction 0.1 --weight-decay 0.01
  --hidden-dropout 0.1 --attention-dropout 0.1
)

launch_torchrun finetune_classification.py "${TASK_ARGS[@]}" "${START_ARGS[@]}" "${TOKENIZER_ARGS[@]}" \
  --bf16 --save "$CHECKPOINT_PATH" --log-interval 10 --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" "$@"
