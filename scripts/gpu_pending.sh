#!/usr/bin/env bash
# The candidates built and tested on the CPU but not yet run on a GPU: their checks and timings, every output checked
# before it is timed (bench_decode.py: greedy tokens in float32 against the eager reference path; profile_prefill.py:
# the graph prefill against the eager one; bench_matmul.py: outputs against the dequantized weights). Run it first in
# a session that has a GPU, each step within the device's 10-minute calls, then `bash scripts/gpu_check.sh -rf`. When
# a candidate is decided (taken into the defaults, or removed with its figures in benchmarks/results.md), take its
# step out; add a step for each new candidate (session 29 ran and removed the fold, block_n_wide and the per-expert
# prefill route this way: benchmarks/results.md, "Session 29"; session 37 took the producer word sums and removed
# fc2's own tiles; session 38 took fc1 without the joint products, removed fc2's split along K and x_proj in
# in_proj's epilogue, took the early reads; session 39 removed out_proj's early NormOut reads and 8 int4 rows a routed
# row program, took the batched step's general kernels as programmatic dependents and their early first tile; session
# 40 timed the W4A8 prefill route, not yet its kernel table; session 41 built W4A8's gated epilogue, W x^T
# tiles and dp4a row programs, timed them and removed session 39's pair candidate; sessions 46-48 took the dp4a row
# programs into batch 8's step; session 49 had no GPU time: its fix of the int8 quantizer for Triton 3.6 and the
# last-program add + norm were untimed; session 50 had none either; session 51 timed sessions 48-50's batch-8
# candidates: took the add + norm in fc2's last programs, removed the fold, the unmasked K loop and the conv step in
# x_proj's kernel).
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
ALL_STEPS="profile8 batches w4a8 w4a8_prefill w4a8_rows matmul_table"  # the step lines below, in order
for s in "${STEPS[@]}"; do
  [[ " $ALL_STEPS " == *" $s "* ]] || { echo "error: unknown step '$s' (steps: $ALL_STEPS)"; exit 2; }
done
wanted() { [ ${#STEPS[@]} -eq 0 ] || [[ " ${STEPS[*]} " == *" $1 "* ]]; }
step() {  # step NAME COMMAND...: run it (if chosen), its output to the terminal and to DEST/NAME.log
  wanted "$1" || return 0
  echo "== $1: ${*:2}"
  "${@:2}" 2>&1 | tee "$DEST/$1.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $1 FAILED (exit $rc)"; status=1; }
}
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
  || exit 1

# where batch 8's time goes since sessions 48 and 51's defaults (fc2 on int8 codes, the add + norm after an MoE
# layer in fc2's last programs; not profiled yet)
step profile8 "$PY" benchmarks/profile_decode.py --format int4_g128 --batch 8 --out "$DEST/profile8.json"
# batches 2 and 4 with session 48's program floor (DecodePolicy.int8_rows_block_n_for: fewer W4A8 rows a program
# while the grid is under min_programs) and session 51's add + norm in fc2's last programs (timed at batch 8 only),
# beside bf16: never timed
step batches "$PY" benchmarks/bench_decode.py --out "$DEST/batches.json" --formats int4_g128,bf16 --batches 2,4 \
  --rounds 2 --check-steps 6 --variants default,noint8norm

# the W4A8 GEMM candidate (session 40: int4 plane words times int8 activations on int8 tensor cores; off by
# default) against cuBLAS bf16 and the runtime's int4 matmul at prefill sizes, every output checked first; session
# 41's tiles with the product taken as W x^T (the suffix l) among them
step w4a8 "$PY" benchmarks/bench_w4a8.py --json "$DEST/w4a8.json" --m 256,2048 --shapes fc1,fc2,in_proj
# ... and in the graph prefill of 2,048 tokens (MatmulPolicy.w4a8_min_m = 64: the expert stacks), beside the
# default route (session 41, H100: 196.3k against 179.5k tok/s and bf16's 202.4k, W x^T since then the default tile;
# w4a8_ungated: fc1's activation an elementwise kernel; w4a8_r: session 40's x W^T)
step w4a8_prefill "$PY" benchmarks/profile_prefill.py --format int4_cli --graph \
  --experts tiles,w4a8,w4a8_ungated,w4a8_r,w4a8_l128

# int8 activations for batch 8's routed experts: dp4a row programs (qmamba.kernels.w4a8_rows, session 41; in the step
# since session 46) against the float-input routed row programs, the kernels alone, every output checked first
step w4a8_rows "$PY" benchmarks/bench_decode_linear.py --out "$DEST/w4a8_rows.json" --rows 8 --only fc1_gated,fc2 \
  --variants rowprog,w4a8_rows_bn16,w4a8_rows_bn32,w4a8_rows_bn64,w4a8_rows_q

# issue 13's table (int4 g128 as the runtime runs it against cuBLAS bf16 and the 4-bit peers, M = 1..2048, every
# output checked first): run whole on the H100 in sessions 29 and 30; its targets are the H200's
step matmul_table "$PY" benchmarks/bench_matmul.py --json "$DEST/matmul_table.json" --experts
exit $status
