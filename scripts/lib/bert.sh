# Sourced by the BERT-family launch scripts (scripts/bert_base.sh, roberta_base.sh,
# distilroberta.sh, finetune_classification.sh) after scripts/lib/launch.sh.
#
#   VOCAB_FILE        a BERT WordPiece vocab.txt (BertWordPieceLowerCase), or
#   TOKENIZER_MODEL   a Hugging Face tokenizer directory (roberta-base, bert-base-uncased, ...)
#   BASE_CHECKPOINT_PATH  optional: start from these weights (an HF model converted with
#                     tools/checkpoint/util.py --model-type BERT --loader hf --saver megatron)

if [[ "${PLAN:-0}" == 1 ]]; then
  echo "error: PLAN=1 plans Llama models (tools/plan.py); for BERT scripts use DRY_RUN=1 to print the command" >&2
  exit 1
fi

# bert_tokenizer_args KIND: TOKENIZER_ARGS for VOCAB_FILE or TOKENIZER_MODEL (KIND names the one
# this preset expects, for the error message).
bert_tokenizer_args() {
  if [[ -n "${VOCAB_FILE:-}" ]]; then
    TOKENIZER_ARGS=(--tokenizer-type BertWordPieceLowerCase --vocab-file "$VOCAB_FILE")
  else
    require TOKENIZER_MODEL "DIR ($1; or VOCAB_FILE=vocab.txt for a BERT WordPiece vocabulary)"
    TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
  fi
}

# bert_checkpoint_args SAVE_INTERVAL: resume CHECKPOINT_PATH when it holds a checkpoint; else
# start from BASE_CHECKPOINT_PATH's weights (its heads the model lacks start fresh), else from scratch.
bert_checkpoint_args() {
  CHECKPOINT_ARGS=(--save "$CHECKPOINT_PATH" --save-interval "$1")
  if [[ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]]; then
    CHECKPOINT_ARGS+=(--load "$CHECKPOINT_PATH")
  elif [[ -n "${BASE_CHECKPOINT_PATH:-}" ]]; then
    CHECKPOINT_ARGS+=(--load "$BASE_CHECKPOINT_PATH" --finetune --use-checkpoint-args --exit-on-missing-checkpoint)
  fi
}

# What makes a BertModel BERT / RoBERTa: post-LN layers (Hugging Face compatible), exact GELU
# (the BERT models force it), dropout 0.1, LayerNorm.
POST_LN_ARGS=(--apply-residual-connection-post-layernorm --attention-dropout 0.1 --hidden-dropout 0.1)

# bf16 with fp32 gradient accumulation and all-reduce, fused attention.
BERT_PRECISION_ARGS=(--bf16 --accumulate-allreduce-grads-in-fp32 --use-flash-attn --attention-softmax-in-fp32)

# masked-LM data: a sentence-split corpus (tools/preprocess_data.py --split-sentences).
bert_data_args() {
  require DATA_PATH "PREFIX (PREFIX_text_sentence from tools/preprocess_data.py --split-sentences)"
  require CHECKPOINT_PATH "DIR (checkpoints and TensorBoard logs are written here)"
  DATA_ARGS=(--data-path "$DATA_PATH" --split 949,50,1)
}
