#!/usr/bin/env bash
# The main job end to end on a CPU-only machine, in a few minutes:
#   install what is missing -> prepare a real corpus offline -> tokenize it ->
#   train a tiny Llama with TP=2 over two processes -> save -> resume -> loss falls.
# Usage: bash examples/quickstart.sh   (OUT=runs/quickstart, ITERS=300 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-300}
HALF=$((ITERS / 2))
PYTHON=${PYTHON:-python3}
# Library deprecation notices (torch, megatron-core) would interleave with the log lines below.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

if ! "$PYTHON" -c "import torch, megatron.core, sentencepiece, transformers, tokenizers, psutil" 2>/dev/null; then
    echo "== installing requirements (CPU torch, megatron-core 0.16.1, ...)"
    "$PYTHON" -m pip install -q -r requirements.txt
fi

echo "== preparing data in $OUT"
"$PYTHON" examples/prepare_sample_data.py --out "$OUT"

rm -rf "$OUT/checkpoints"
MODEL=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4
    --group-query-attention --num-query-groups 2 --seq-length 128 --max-position-embeddings 128
    --normalization RMSNorm --swiglu --use-rotary-position-embeddings --disable-bias-linear
    --untie-embeddings-and-output-weights --use-flash-attn --attention-dropout 0 --hidden-dropout 0
)
PARALLEL=(--tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer)
TRAINING=(
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
    --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0
)
DATA=(
    --data-path "$OUT/corpus_text_document" --split 90,8,2
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$OUT/tokenizer.model"
)
LOGGING=(--log-interval 25 --eval-interval 75 --eval-iters 5 --tensorboard-dir "$OUT/tensorboard")
CHECKPOINTS=(--save "$OUT/checkpoints" --save-interval 75)

echo "== training iterations 1-$HALF (TP=2 on 2 CPU processes), then stopping"
torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29500}" pretrain_gpt.py \
    "${MODEL[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" "${DATA[@]}" "${LOGGING[@]}" "${CHECKPOINTS[@]}" \
    --exit-interval "$HALF" 2>&1 | grep -v -i "warn" | tee "$OUT/train_part1.log"

echo "== resuming from $OUT/checkpoints to iteration $ITERS"
torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29500}" pretrain_gpt.py \
    "${MODEL[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" "${DATA[@]}" "${LOGGING[@]}" "${CHECKPOINTS[@]}" \
    --load "$OUT/checkpoints" 2>&1 | grep -v -i "warn" | tee "$OUT/train_part2.log"

echo "== loss by iteration (training, then validation)"
grep -h -o "iteration *[0-9]*/ *[0-9]* .*lm loss: [0-9.E+-]*" "$OUT"/train_part*.log \
    | sed -E 's/iteration *([0-9]+)\/.*lm loss: ([0-9.E+-]+)/  iteration \1: lm loss \2/'
grep -h "validation loss at iteration" "$OUT"/train_part*.log | sed -E 's/ \| lm loss PPL.*//' || true
