#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU machine (an H100 or H200 through the device tool: Python 3.12,
# torch with CUDA, no internet, no megatron-core, no Transformer Engine or apex).
#
# 1. Here, on the developer machine (it has PyPI): fetch megatron-core 0.16.1 for Python 3.12 into .whl/ (git-ignored)
#        bash benchmarks/gpu_session.sh --fetch
# 2. Two device calls, carrying that folder (a call may run 10 minutes; each step has its own time limit):
#        run(command="bash benchmarks/gpu_session.sh env tests throughput-1b", carry=[".whl"], timeout_s=600)
#        run(command="bash benchmarks/gpu_session.sh throughput-7b activation-memory", carry=[".whl"], timeout_s=600)
#    No step named runs all five. Results go to $OUT (the device tool brings them back), else to
#    runs/gpu_session/. Copy the tables into benchmarks/results/ with the GPU's name.
#
# Prepared without a GPU: --fetch ran on the developer machine; the steps themselves have not run on a GPU yet.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl

if [[ "${1:-}" == "--fetch" ]]; then
    exec "$PY" -m pip download megatron-core==0.16.1 --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS"
fi

OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(env tests throughput-1b throughput-7b activation-memory)

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    wheel=$(ls "$WHEELS"/megatron_core-0.16.1-cp312-*.whl 2>/dev/null | head -1)
    if [[ -z "$wheel" ]]; then
        echo "error: megatron-core is not installed and $WHEELS/ holds no wheel: run 'bash $0 --fetch' on a machine" \
             "with PyPI and carry $WHEELS" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-deps --no-index "$wheel" || exit 2
fi

step() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $? -> $OUT/$name.txt"
    tail -n 15 "$OUT/$name.txt"
}

for s in "${steps[@]}"; do
    case $s in
        env) step env 60 bash -c "nvidia-smi; $PY -c 'import torch, megatron.core, triton; print(torch.__version__, \
torch.version.cuda, megatron.core.__version__, triton.__version__, torch.cuda.get_device_name())'" ;;
        tests) step tests 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests ;;
        throughput-1b) step throughput-1b 300 "$PY" benchmarks/gpu_throughput.py --config 1b --warmup 3 --iters 10 \
            --out "$OUT/gpu_throughput_1b.md" ;;
        throughput-7b) step throughput-7b 300 "$PY" benchmarks/gpu_throughput.py --config 7b --warmup 2 --iters 6 \
            --out "$OUT/gpu_throughput_7b.md" ;;
        activation-memory) step activation-memory 280 "$PY" benchmarks/activation_memory_gpu.py \
            --out "$OUT/activation_memory.md" ;;
        *) echo "unknown step '$s': choose from env tests throughput-1b throughput-7b activation-memory" >&2; exit 2 ;;
    esac
done
