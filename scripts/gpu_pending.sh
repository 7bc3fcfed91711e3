#!/usr/bin/env bash
# The candidates built and tested on the CPU but not yet timed on a GPU (benchmarks/results.md, sessions 27-29):
# their GPU tests, then their A/B against the defaults (every variant's output checked against the reference path
# before it is timed: bench_decode.py's greedy tokens in float32, profile_prefill.py's graph prefill against the
# eager one, bench_matmul.py's outputs against the dequantized weights). Run it first in a session that has a GPU:
# ~15 min on an H200 in all (an estimate), so over the device's 10-minute calls, e.g. `tests decode_bm`, then
# `decode_cli decode_mamba prefill_experts`, then `matmul_table`; then `bash scripts/gpu_check.sh -rf`. When a
# candidate is decided (taken into the defaults, or removed with its figures in results.md), take its step out.
#
#   bash scripts/gpu_pending.sh [OUT_DIR [STEP ...]]   # logs and JSON under OUT_DIR [${OUT:-runs/gpu-pending}];
#                                                       # STEPs: a subset of those below (default: all, in order)
#
# Every chosen step runs; the exit status is non-zero when any of them failed (a failed check is not a figure).
# tests/qmamba/test_bench_decode_variants.py parses the benchmark lines below (arguments, variants, routes).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEST=${1:-${OUT:-$ROOT/runs/gpu-pending}}
shift $(( $# > 0 ? 1 : 0 ))
STEPS=("$@")
mkdir -p "$DEST"
status=0
ALL_STEPS="tests decode_bm decode_cli decode_mamba prefill_experts matmul_table"  # the step lines below, in order
for s in "${STEPS[@]}"; do
  [[ " $ALL_STEPS " == *" $s "* ]] || { echo "error: unknown step '$s' (steps: $ALL_STEPS)"; exit 2; }
done
wanted() { [ ${#STEPS[@]} -eq 0 ] || [[ " ${STEPS[*]} " == *" $1 "* ]]; }
step() {  # step NAME COMMAND...: run it (if chosen), its output to the terminal and to DEST/NAME.log
  [[ " $ALL_STEPS " == *" $1 "* ]] || { echo "error: step $1 is not in ALL_STEPS"; exit 2; }
  wanted "$1" || return 0
  echo "== $1: ${*:2}"
  "${@:2}" 2>&1 | tee "$DEST/$1.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $1 FAILED (exit $rc)"; status=1; }
}
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
  || exit 1

# session 27: out_proj folded into the SSM update (DecodePolicy.ssm_fold) and wide-matrix row blocks (block_n_wide)
step tests env QMAMBA_TEST_DEVICE=cuda TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
    tests/qmamba/kernels/test_ssm_fold.py tests/qmamba/test_fused_step.py tests/qmamba/kernels/test_decode_linear.py \
    -k "fold or wide_matrix"
step decode_bm "$PY" benchmarks/bench_decode.py --out "$DEST/decode_bm.json" --formats int4_g128,bf16 --batches 1 \
    --check-steps 8 --rounds 3 --variants default,fold,fold64w8,fold16w4,headbn16
step decode_cli "$PY" benchmarks/bench_decode.py --out "$DEST/decode_cli.json" --formats int4_cli --batches 1 \
    --check-steps 8 --rounds 3 --variants default,fold
step decode_mamba "$PY" benchmarks/bench_decode.py --out "$DEST/decode_mamba.json" --preset mamba-1.4b \
    --formats int4_g128,bf16 --batches 1 --check-steps 8 --rounds 3 --variants default,fold
# session 29: the prefill's routed int4 experts dequantized one expert at a time (MatmulPolicy.dequant_experts_min_m:
# a one-expert temporary, 23 MB for fc1, which the float GEMM right after it may read from L2), never timed under the
# CUDA-graph prefill; beside the int4 tile kernel (the default) and the whole stack at once (+5.5%, session 22, for a
# 182 MB temporary that breaks the 2.0 GB peak)
step prefill_experts "$PY" benchmarks/profile_prefill.py --format int4_cli --graph \
    --experts tiles,per_expert,whole_stack --out "$DEST/prefill_experts.json"
# session 29: issue 13's table (int4 g128 as the runtime runs it against cuBLAS bf16 and the 4-bit peers, M = 1..2048,
# every output checked first), never run: benchmarks/bench_matmul.py replaces the retired, unchecked bench_kernels.py
step matmul_table "$PY" benchmarks/bench_matmul.py --json "$DEST/matmul_table.json" --experts
exit $status
