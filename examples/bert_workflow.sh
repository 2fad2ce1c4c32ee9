#!/usr/bin/env bash
# FinLlama's PLM workflow on a CPU-only machine, in a few minutes:
#   prepare a corpus and a WordPiece vocabulary offline -> pretrain a small
#   post-LN BERT (masked LM + sentence order) with TP=2 + sequence parallelism
#   over two processes -> fine-tune it for 3-class sentence classification
#   with DP=2 (accuracy and macro-F1 on a held-out FinGPT-format file after
#   every epoch) -> export BertForSequenceClassification -> score it with
#   transformers alone.
# Usage: bash examples/bert_workflow.sh   (OUT=runs/bert, PRETRAIN_ITERS=400 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bert}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-400}
PYTHON=${PYTHON:-python3}
PORT=${MASTER_PORT:-29500}

echo "== preparing data in $OUT"
"$PYTHON" examples/prepare_bert_sample.py --out "$OUT"

rm -rf "$OUT/pretrained" "$OUT/classifier" "$OUT/classifier-hf"
MODEL=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64
    --apply-residual-connection-post-layernorm --use-flash-attn --attention-dropout 0.1 --hidden-dropout 0.1
)
TOKENIZER=(--tokenizer-type BertWordPieceLowerCase --vocab-file "$OUT/vocab.txt")

echo "== pretraining ($PRETRAIN_ITERS iterations, TP=2 + sequence parallelism on 2 CPU processes)"
torchrun --nproc_per_node 2 --master_port "$PORT" pretrain_bert.py "${MODEL[@]}" "${TOKENIZER[@]}" \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --micro-batch-size 16 --global-batch-size 32 --train-iters "$PRETRAIN_ITERS" \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style linear --lr-warmup-fraction 0.05 --weight-decay 0.01 \
    --data-path "$OUT/corpus_text_sentence" --split 95,5,0 --data-cache-path "$OUT/cache" \
    --log-interval 50 --eval-interval 200 --eval-iters 10 --save "$OUT/pretrained" \
    2>&1 | grep -v -i "warn" | tee "$OUT/pretrain.log"

echo "== fine-tuning for classification (3 epochs, DP=2)"
torchrun --nproc_per_node 2 --master_port "$PORT" finetune_classification.py "${TOKENIZER[@]}" \
    --load "$OUT/pretrained" --finetune --use-checkpoint-args --seq-length 64 \
    --train-data "$OUT/train.jsonl" --valid-data "$OUT/valid_fingpt.jsonl" --epochs 3 \
    --micro-batch-size 16 --lr 1e-3 --lr-warmup-fraction 0.1 --hidden-dropout 0.1 --init-method-std 0.2 \
    --log-interval 50 --save "$OUT/classifier" 2>&1 | grep -v -i "warn" | tee "$OUT/classify.log"

echo "== exporting to Hugging Face (verified: class logits of both sides)"
"$PYTHON" tools/checkpoint/util.py --model-type BERT --loader megatron --saver hf \
    --load-dir "$OUT/classifier" --save-dir "$OUT/classifier-hf" --verify 2>&1 | grep -E "^(saved|verify)"
"$PYTHON" examples/score_hf_classifier.py --model "$OUT/classifier-hf" --data "$OUT/valid_fingpt.jsonl" \
    --max-length 64 2>&1 | grep -v -i "warn"

echo "== summary"
grep -h -o "iteration *[0-9]*/ *[0-9]* .*lm loss: [0-9.E+-]* | mlm accuracy: [0-9.E+-]*" "$OUT/pretrain.log" \
    | sed -E 's/iteration *([0-9]+)\/.*lm loss: ([0-9.E+-]+) \| mlm accuracy: ([0-9.E+-]+)/'\
'  pretraining iteration \1: lm loss \2, mlm accuracy \3/'
grep -h "validation loss at iteration" "$OUT/pretrain.log" "$OUT/classify.log" | sed -E 's/^ *//'
