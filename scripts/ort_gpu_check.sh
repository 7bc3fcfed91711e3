#!/usr/bin/env bash
# ONNX on the GPU (run on the GPU machine, not in CI): exports checked against the PyTorch path on onnxruntime's CUDA
# provider, node placement, speed beside qmamba's Triton path (benchmarks/bench_onnx_gpu.py; its docstring says
# what each figure is). onnxruntime-gpu comes from scripts/ort_gpu_setup.sh (see scripts/ort_gpu_setup.md).
#   bash scripts/ort_gpu_check.sh OUT_DIR [bench_onnx_gpu.py options]      e.g. --phase torch, --variants ...
#   bash scripts/ort_gpu_check.sh OUT_DIR --cpu --quick                     dry run anywhere (CPU provider)
# Writes OUT_DIR/onnx_gpu.json, OUT_DIR/onnx_gpu.md and OUT_DIR/log.txt; exits non-zero when a check fails.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:?usage: bash scripts/ort_gpu_check.sh OUT_DIR [options]}
shift
PY=${PYTHON:-python3}
eval "$(bash "$ROOT/scripts/ort_gpu_setup.sh" env)"   # onnxruntime-gpu in /tmp/site, the CUDA libraries' folders
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p "$OUT_DIR"
"$PY" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers(),
      '| torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
"$PY" "$ROOT/benchmarks/bench_onnx_gpu.py" --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
