# Sourced by the launch scripts (scripts/llama_*.sh, scripts/*_sft.sh, *_lora.sh): reads the
# cluster shape and paths from the environment, then starts pretrain_gpt.py or finetune_gpt.py on
# this node with torchrun, prints that command, or checks the flags with the planner.
#
#   DATA_PATH, TOKENIZER_MODEL, CHECKPOINT_PATH    required (the script names any others)
#   VALID_DATA_PATH                                fine-tuning scripts: held-out SFT examples (optional)
#   NNODES, NODE_RANK, MASTER_ADDR                 required to launch (scripts/slurm/ sets them)
#   MASTER_PORT (6000), GPUS_PER_NODE (8), PYTHON (python)
#   DRY_RUN=1   print the torchrun command instead of running it
#   PLAN=1      run tools/plan.py on the same flags at NNODES x GPUS_PER_NODE GPUs
#               (PLAN_ARGS adds planner flags, e.g. "--gpu A100 --tflops-per-gpu 161")
# In DRY_RUN/PLAN mode nothing needs to exist: an unset value is shown as
# <NAME>, and NNODES defaults to the node count the script's layout is planned for.
# Flags given to the script are appended after its own, so they override them.

set -euo pipefail

LAUNCH_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

print_only() {
  [[ "${DRY_RUN:-0}" == 1 || "${PLAN:-0}" == 1 ]]
}

# require NAME HINT: stop with an error naming the fix when $NAME is unset.
require() {
  local name=$1 hint=$2
  [[ -n "${!name:-}" ]] && return 0
  if print_only; then
    echo "note: $name is not set; shown as <$name>" >&2
    printf -v "$name" '<%s>' "$name"
    return 0
  fi
  echo "error: $name is not set: export $name=$hint (DRY_RUN=1 or PLAN=1 prints the command without it)" >&2
  exit 1
}

require_integer() {
  local name=$1
  if [[ ! "${!name}" =~ ^[0-9]+$ ]] && ! { print_only && [[ "${!name}" == "<$name>" ]]; }; then
    echo "error: $name=${!name} is not a whole number" >&2
    exit 1
  fi
}

# cluster_env PLANNED_NODES: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE.
cluster_env() {
  local planned=$1
  GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  MASTER_PORT=${MASTER_PORT:-6000}
  if print_only; then
    NNODES=${NNODES:-$planned}
  fi
  require NNODES "N (the number of nodes; this script's layout is planned for $planned nodes of 8 GPUs)"
  require NODE_RANK "R (this node's index, 0 to NNODES-1; scripts/slurm/pretrain.sbatch sets it)"
  require MASTER_ADDR "HOST (the address of node 0, reachable from every node)"
  local name
  for name in NNODES NODE_RANK MASTER_PORT GPUS_PER_NODE; do
    require_integer "$name"
  done
}

# launch_pretrain FLAG...: torchrun pretrain_gpt.py FLAG... on this node (or DRY_RUN / PLAN).
launch_pretrain() {
  launch_training pretrain_gpt.py "$@"
}

# launch_finetune FLAG...: torchrun finetune_gpt.py FLAG... (supervised fine-tuning) on this node (or DRY_RUN / PLAN).
launch_finetune() {
  launch_training finetune_gpt.py "$@"
}

# launch_training ENTRY_POINT FLAG...: torchrun ENTRY_POINT FLAG..., or with PLAN=1 the planner on the same flags.
launch_training() {
  local entry=$1
  shift
  if [[ "${PLAN:-0}" == 1 ]]; then
    local plan_args=(--world-size "$((NNODES * GPUS_PER_NODE))" --gpus-per-node "$GPUS_PER_NODE")
    if [[ ! -e "$TOKENIZER_MODEL" ]]; then
      # the tokenizer's vocabulary when its files are not here: the script's model's, else Llama 2's
      plan_args+=(--vocab-size "${PLAN_VOCAB_SIZE:-32000}")
    fi
    # shellcheck disable=SC2086  # PLAN_ARGS is a list of flags
    exec "${PYTHON:-python}" "$LAUNCH_REPO_ROOT/tools/plan.py" "$@" "${plan_args[@]}" ${PLAN_ARGS:-}
  fi
  launch_torchrun "$entry" "$@"
}

# launch_torchrun ENTRY_POINT FLAG...: torchrun ENTRY_POINT (a file at the repo root) FLAG... on this
# node, or print the command with DRY_RUN=1.
launch_torchrun() {
  local entry=$1
  shift
  local cmd=(torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
             "$LAUNCH_REPO_ROOT/$entry" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    return 0
  fi
  # One CUDA stream queue per device, so that sequence-parallel communication
  # is issued before the GEMMs it overlaps with (Megatron's requirement).
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  cd "$LAUNCH_REPO_ROOT"
  exec "${cmd[@]}"
}

# What makes a GPTModel a Llama: RMSNorm, SwiGLU, rotary positions, no biases,
# no dropout, untied input and output embeddings.
LLAMA_LAYER_ARGS=(
  --normalization RMSNorm
  --swiglu
  --use-rotary-position-embeddings --no-position-embedding
  --disable-bias-linear
  --attention-dropout 0 --hidden-dropout 0
  --untie-embeddings-and-output-weights
)
# Llama 1/2.
LLAMA_ARGS=("${LLAMA_LAYER_ARGS[@]}" --norm-epsilon 1e-5 --rotary-base 10000)
# Llama 3.x (Llama-3.1-8B/70B config.json): rope theta 500000 and Llama 3.1's rope
# frequency scaling by 8 (low 1, high 4, original 8192: megatron-core's constants).
LLAMA3_ARGS=("${LLAMA_LAYER_ARGS[@]}" --norm-epsilon 1e-5 --rotary-base 500000
             --use-rope-scaling --rope-scaling-factor 8)
# Qwen2 / Qwen2.5 (Qwen2.5-7B/72B config.json): biases on q, k and v only, rope theta
# 1000000, RMSNorm epsilon 1e-6.
QWEN2_ARGS=("${LLAMA_LAYER_ARGS[@]}" --norm-epsilon 1e-6 --rotary-base 1000000 --add-qkv-bias)

# bf16 with fp32 gradient accumulation and all-reduce (Megatron-LM's default
# for bf16), fused attention (Transformer Engine's, or torch SDPA).
PRECISION_ARGS=(
  --bf16 --accumulate-allreduce-grads-in-fp32
  --use-flash-attn --attention-softmax-in-fp32
)

# Llama 2's AdamW settings.
ADAMW_ARGS=(--adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --weight-decay 0.1 --clip-grad 1.0)

# logging_args EVAL_INTERVAL: a log line every step (with TFLOP/s and tokens/day),
# TensorBoard beside the checkpoints, 10 validation batches every EVAL_INTERVAL steps.
logging_args() {
  LOGGING_ARGS=(
    --log-interval 1 --log-throughput --tensorboard-dir "$CHECKPOINT_PATH/tensorboard"
    --eval-interval "$1" --eval-iters 10
  )
}

# llama_data_args: the corpus (a prefix, or a blend "W1 PREFIX1 W2 PREFIX2") and the Llama 2 tokenizer.
llama_data_args() {
  local blend
  read -r -a blend <<< "$DATA_PATH"
  DATA_ARGS=(
    --data-path "${blend[@]}" --split 949,50,1
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL"
  )
}

require_paths() {
  require DATA_PATH "PREFIX (the .bin/.idx prefix from tools/preprocess_data.py, or a blend \"W1 PREFIX1 W2 PREFIX2\")"
  require TOKENIZER_MODEL "PATH (the Llama 2 sentencepiece tokenizer.model)"
  require CHECKPOINT_PATH "DIR (checkpoints and TensorBoard logs are written here)"
}

# sft_data_args: supervised fine-tuning of a converted Hugging Face base. DATA_PATH is a
# tools/preprocess_sft_data.py prefix (made with the base's own chat template), VALID_DATA_PATH
# an optional held-out one; examples are packed; TOKENIZER_MODEL is the base's HF directory.
sft_data_args() {
  require DATA_PATH "PREFIX (tools/preprocess_sft_data.py --output-prefix, with TOKENIZER_MODEL's chat template)"
  require TOKENIZER_MODEL "DIR (the base model's Hugging Face directory: tokenizer.json and tokenizer_config.json)"
  require CHECKPOINT_PATH "DIR (checkpoints and TensorBoard logs are written here)"
  DATA_ARGS=(
    --data-path "$DATA_PATH" --sft-packing
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  )
  if [[ -n "${VALID_DATA_PATH:-}" ]]; then
    DATA_ARGS+=(--valid-data-path "$VALID_DATA_PATH")
  fi
}

# extension_checkpoint_args SAVE_INTERVAL: start from BASE_CHECKPOINT_PATH with
# --finetune (weights only: iteration 0, new optimizer state and RNG); a
# restarted job finds its own checkpoint in CHECKPOINT_PATH and resumes it whole.
extension_checkpoint_args() {
  require BASE_CHECKPOINT_PATH "DIR (the checkpoint to extend; tools/checkpoint/util.py converts a HF Llama into one)"
  if [[ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]]; then
    CHECKPOINT_ARGS=(--load "$CHECKPOINT_PATH")
  else
    CHECKPOINT_ARGS=(--load "$BASE_CHECKPOINT_PATH" --finetune --exit-on-missing-checkpoint)
  fi
  CHECKPOINT_ARGS+=(--save "$CHECKPOINT_PATH" --save-interval "$1")
}
