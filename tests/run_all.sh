#!/usr/bin/env bash
# Run the whole test suite on a CPU-only machine; installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, megatron.core, sentencepiece, transformers, tokenizers, triton, liger_kernel, peft, bitsandbytes, trl, psutil, pytest" 2>/dev/null; then
    echo "== installing requirements (CPU torch, megatron-core 0.16.1, ...)"
    "$PYTHON" -m pip install -q -r requirements.txt
fi
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@" tests
