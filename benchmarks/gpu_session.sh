#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU machine (an H100 or H200 through the device tool: Python 3.12,
# torch with CUDA and Triton, no internet; no megatron-core, liger-kernel, pydantic, Transformer Engine or apex).
#
# 1. Here, on the developer machine (it has PyPI), fetch what that machine lacks into .whl/ (git-ignored):
#        bash benchmarks/gpu_session.sh --fetch [MEGATRON_LM_GIT]
#    Wheels for Python 3.12: megatron-core 0.16.1, liger-kernel 0.8.5, and pydantic with its three dependencies
#    (Megatron-LM's training package imports it); and .whl/Megatron-LM: Megatron-LM core_v0.16.1's pretrain_gpt.py,
#    its builders and megatron/{training,rl,legacy,post_training}, cloned from MEGATRON_LM_GIT (default: GitHub; a
#    local mirror works). Its megatron/core is left out: the wheel is the same release, with compiled helpers.
# 2. Two device calls, carrying that folder (each under 10 minutes: the step limits add up to 580 s each):
#        run(command="bash benchmarks/gpu_session.sh env kernels throughput-1b", carry=[".whl"], timeout_s=600)
#        run(command="bash benchmarks/gpu_session.sh tests throughput-largest", carry=[".whl"], timeout_s=600)
#    kernels times each kernel against the paths it replaces (and picks the cross-entropy implementation);
#    throughput-1b runs the 1b config with the kernels on and off and Megatron-LM's pretrain_gpt.py beside them;
#    throughput-largest the largest preset the planner fits in the GPU, kernels on and off.
#    activation-memory (issue 9's planner check) is a step of its own, for a third call when device time allows.
#    Results go to $OUT (the device tool brings back 8 files at most), else to runs/gpu_session/. Copy the tables
#    into benchmarks/results/ with the GPU's name.
#
# Prepared without a GPU: --fetch ran on the developer machine; the steps have not run on a GPU yet.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl
MEGATRON_LM=$WHEELS/Megatron-LM

if [[ "${1:-}" == "--fetch" ]]; then
    source=${2:-https://github.com/NVIDIA/Megatron-LM.git}
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" megatron-core==0.16.1 liger-kernel==0.8.5 pydantic==2.13.4 pydantic-core==2.46.4 \
        annotated-types==0.7.0 typing-inspection==0.4.2 || exit 2
    clone=$(mktemp -d)
    trap 'rm -rf "$clone"' EXIT
    git -c advice.detachedHead=false clone -q --depth 1 --branch core_v0.16.1 "$source" "$clone/src" || exit 2
    rm -rf "$MEGATRON_LM.partial" && mkdir -p "$MEGATRON_LM.partial/megatron"
    cp "$clone"/src/{pretrain_gpt.py,gpt_builders.py,model_provider.py} "$MEGATRON_LM.partial/" &&
        cp -r "$clone"/src/megatron/{training,rl,legacy,post_training} "$MEGATRON_LM.partial/megatron/" || exit 2
    rm -rf "$MEGATRON_LM" && mv "$MEGATRON_LM.partial" "$MEGATRON_LM"
    du -sh "$WHEELS"
    exit 0
fi

OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
steps=("$@")
all=(env tests kernels throughput-1b throughput-largest activation-memory)
[[ ${#steps[@]} -eq 0 ]] && steps=("${all[@]}")

if ! "$PY" -c "import megatron.core, liger_kernel, pydantic" 2>/dev/null; then
    if ! ls "$WHEELS"/megatron_core-0.16.1-cp312-*.whl >/dev/null 2>&1; then
        echo "error: megatron-core is not installed and $WHEELS/ holds no wheel: run 'bash $0 --fetch' on a machine" \
             "with PyPI and carry $WHEELS" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
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
        env) step env 30 bash -c "nvidia-smi; $PY -c 'import torch, megatron.core, triton, liger_kernel; \
print(torch.__version__, torch.version.cuda, megatron.core.__version__, triton.__version__, torch.cuda.get_device_name())'" ;;
        tests) step tests 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests ;;
        kernels) step kernels 150 "$PY" benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.md" ;;
        throughput-1b) step throughput-1b 400 "$PY" benchmarks/gpu_throughput.py --config 1b --kernels on off \
            --warmup 2 --iters 6 --compare-megatron-lm "$MEGATRON_LM" --out "$OUT/gpu_throughput_1b.md" ;;
        throughput-largest) step throughput-largest 380 "$PY" benchmarks/gpu_throughput.py --config largest \
            --kernels on off --warmup 2 --iters 4 --out "$OUT/gpu_throughput_largest.md" ;;
        activation-memory) step activation-memory 280 "$PY" benchmarks/activation_memory_gpu.py \
            --out "$OUT/activation_memory.md" ;;
        *) echo "unknown step '$s': choose from ${all[*]}" >&2; exit 2 ;;
    esac
done
