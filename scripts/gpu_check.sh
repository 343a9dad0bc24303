#!/usr/bin/env bash
# The GPU check: the device-parametrised contracts on CUDA, then the benchmarks on CUDA, into docs/bench/gpu/.
#   make gpu-check                 (or: bash scripts/gpu_check.sh [OUT_DIR])
# Needs a CUDA build of torch (TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" make setup) and a GPU.
# Optional: flash-linear-attention for the `fla` kernel backend of causal LightNet (tested when present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-docs/bench/gpu}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device is visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing to check." >&2
    exit 1
fi
"$PY" -c "import torch; print('gpu-check:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
# contracts: fast == reference, causality, cached == full, training and resume (CUDA tolerance in the file)
"$PY" -m pytest -q tests/test_devices.py tests/test_gla_backends.py tests/test_hardware.py -k "cuda or fla or not cpu"
mkdir -p "$OUT"
"$PY" -m polyattn bench train --device cuda --precisions native --out "$OUT/train"
"$PY" -m polyattn bench peers --device cuda --precisions native --out "$OUT/peers"
"$PY" -m polyattn bench decode --device cuda --out "$OUT/decode"
"$PY" -m polyattn bench mixers --device cuda --out "$OUT/mixers" --time-cap 10
echo "gpu-check: tables, JSON and plots in $OUT"
