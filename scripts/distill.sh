#!/bin/bash
# Distillation by synthetic data (DongwuLLM): a teacher continues prefixes of
# pretraining documents, the continuations are tokenized and mixed into the
# pretraining data at a chosen token share, and the student continues
# pretraining from its checkpoint on that blend.
#
#   export INPUT=/data/pretrain/*.jsonl TEACHER=/models/teacher-hf SYNTH_DIR=/data/synth \
#          ORIGINAL_DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/models/llama2/tokenizer.model \
#          BASE_CHECKPOINT_PATH=/ckpt/student CHECKPOINT_PATH=/ckpt/student-distill \
#          NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
#   bash scripts/distill.sh --train-iters 2400 --lr 1e-5 --min-lr 1e-6   # flags go to the training script
#
# Stages (STAGES, default "generate blend train"), each safe to rerun:
#   generate  tools/generate_synthetic_data.py -> $SYNTH_DIR/shards (resumes where it stopped;
#             GEN_ARGS adds flags, e.g. "--prefix-length 256 --max-new-tokens 1024 --temperature 0.8")
#   blend     tools/build_synthetic_blend.py: tokenizes the shards into $SYNTH_DIR/synthetic_text_document
#             and writes the --data-path blend with SYNTHETIC_FRACTION (0.005) of the sampled tokens
#             to $SYNTH_DIR/data_path.txt
#   train     TRAIN_SCRIPT (scripts/llama_30B.sh: the student's shape and layout) on that blend, from
#             BASE_CHECKPOINT_PATH with --finetune; a restarted job resumes its own CHECKPOINT_PATH
# Also: TOKENIZER_TYPE (Llama2Tokenizer, the student's), GPUS_PER_NODE (8: vLLM's tensor parallel size),
# WORKERS (8, tokenizer processes), DRY_RUN=1 prints the commands instead of running them.
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

STAGES=${STAGES:-generate blend train}
SYNTHETIC_FRACTION=${SYNTHETIC_FRACTION:-0.005}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$LAUNCH_REPO_ROOT/scripts/llama_30B.sh}
PY=${PYTHON:-python}
require SYNTH_DIR "DIR (synthetic shards, their indexed dataset and the blend go here)"

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ " $STAGES " == *" generate "* ]]; then
  require INPUT "PATH (pretraining jsonl: a file, a folder or a quoted glob)"
  require TEACHER "DIR (the teacher as a Hugging Face model directory)"
  # shellcheck disable=SC2086  # GEN_ARGS is a list of flags
  run "$PY" "$LAUNCH_REPO_ROOT/tools/generate_synthetic_data.py" --input "$INPUT" --teacher "$TEACHER" \
    --output-dir "$SYNTH_DIR" --tensor-parallel-size "${GPUS_PER_NODE:-8}" ${GEN_ARGS:-} || {
    status=$?
    [[ $status == 3 ]] && echo "error: some prompts failed after every retry (see $SYNTH_DIR/failed.jsonl): " \
      "rerun this script to retry them, or STAGES=\"blend train\" to go on without them" >&2
    exit $status
  }
fi

if [[ " $STAGES " == *" blend "* ]]; then
  require ORIGINAL_DATA_PATH "PREFIX (the pretraining data: prefixes, or a blend \"W1 PREFIX1 W2 PREFIX2\")"
  require TOKENIZER_MODEL "PATH (the student's tokenizer model)"
  read -r -a original <<< "$ORIGINAL_DATA_PATH"
  blend_cmd=("$PY" "$LAUNCH_REPO_ROOT/tools/build_synthetic_blend.py" --synthetic-dir "$SYNTH_DIR"
             --output-prefix "$SYNTH_DIR/synthetic" --tokenizer-type "$TOKENIZER_TYPE"
             --tokenizer-model "$TOKENIZER_MODEL" --workers "${WORKERS:-8}"
             --original-data-path "${original[@]}" --synthetic-fraction "$SYNTHETIC_FRACTION")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    run "${blend_cmd[@]}"
  else
    blend=$("${blend_cmd[@]}")
    echo "$blend" > "$SYNTH_DIR/data_path.txt.tmp" && mv "$SYNTH_DIR/data_path.txt.tmp" "$SYNTH_DIR/data_path.txt"
    echo "blend: $blend" >&2
  fi
fi

if [[ " $STAGES " == *" train "* ]]; then
  if [[ -f "$SYNTH_DIR/data_path.txt" ]]; then
    DATA_PATH=$(< "$SYNTH_DIR/data_path.txt")
  elif [[ "${DRY_RUN:-0}" == 1 ]]; then
    DATA_PATH="<$SYNTH_DIR/data_path.txt>"
  else
    echo "error: $SYNTH_DIR/data_path.txt is missing: run the blend stage first (STAGES=\"blend train\")" >&2
    exit 1
  fi
  export DATA_PATH
  require CHECKPOINT_PATH "DIR (the distilled student's checkpoints)"
  resume=()
  if [[ ! -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]]; then
    require BASE_CHECKPOINT_PATH \
      "DIR (the student's checkpoint to continue from; tools/checkpoint/util.py converts a HF model)"
    resume=(--load "$BASE_CHECKPOINT_PATH" --finetune --exit-on-missing-checkpoint)
  fi
  exec bash "$TRAIN_SCRIPT" "${resume[@]}" "$@"
fi
