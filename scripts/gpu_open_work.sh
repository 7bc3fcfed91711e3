#!/usr/bin/env bash
# The GPU runs that issue 13 waits for, in parts that each end inside one device call (600 s): the Gluon int4 GEMM
# and batch 8's expert row programs checked on the GPU and timed beside what they would replace, then the GPU check.
# Every figure is checked against its reference before it is timed (the scripts below refuse otherwise). Not for CI:
# it needs a CUDA GPU (Hopper for the Gluon part). (Session 25 ran its other parts: the persistent decode step, timed
# and removed; benchmarks/results.md, "Session 25".)
#
#   bash scripts/gpu_open_work.sh PART [PART ...]     PART: gluon | check | all
#     gluon  the Gluon GEMM's GPU tests, then probe_gluon_gemm at 8 / 256 / 2048 rows; batch 8's expert row
#            programs at 8 int4 rows a program against 4 (bench_decode_linear)                        ~6 min
#     check  bash scripts/gpu_check.sh -rf                                                              ~4 min
#
# Logs and JSON go to $OUT (the device tool's folder) or runs/gpu-open-work; at most 8 files a part (what one
# device call brings back). Each command runs under `timeout` (QMAMBA_GPU_PART_LIMIT seconds for the part, default
# 570, shared out below), so a part returns its logs even when a command hangs. Exit status: the number of failed
# commands (0: all passed). In a device call:
#   export PYTHONPATH=$PWD; bash scripts/gpu_open_work.sh gluon
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=${OUT:-$ROOT/runs/gpu-open-work}
mkdir -p "$LOGS"
LIMIT=${QMAMBA_GPU_PART_LIMIT:-570}
START=$SECONDS
failed=0

# run NAME SHARE CMD...: CMD under a timeout of SHARE percent of the part's limit (at most what is left of it),
# output to $LOGS/NAME.log; a failure or a timeout counts, the part goes on
run() {
  local name=$1 share=$2; shift 2
  local left=$((LIMIT - (SECONDS - START))) t
  t=$((LIMIT * share / 100)); [ "$t" -gt "$left" ] && t=$left
  if [ "$t" -lt 10 ]; then echo "== $name: skipped, the part's time is spent" | tee -a "$LOGS/summary.txt"; failed=$((failed + 1)); return; fi
  echo "== $name ($t s): $*" | tee -a "$LOGS/summary.txt"
  timeout -k 10 "$t" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - START)) s of the part; last lines:" | tee -a "$LOGS/summary.txt"
  tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /' | tee -a "$LOGS/summary.txt"
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
}

part_gluon() {
  QMAMBA_TEST_DEVICE=cuda TRITON_INTERPRET=0 run gluon_tests 40 "$PY" -m pytest -q -p no:cacheprovider \
    tests/qmamba/kernels/test_probe_gluon_gemm.py
  run gluon_probe 45 "$PY" benchmarks/probe_gluon_gemm.py --m 8,256,2048
  # batch 8's expert row programs at 8 int4 rows a program against 4 (kernels alone, checked first)
  run gluon_rowprog 15 "$PY" benchmarks/bench_decode_linear.py --out "$LOGS/gluon_rowprog.json" --rows 8 \
    --only fc1_gated,fc2 --variants rowprog,rowprog_bn8,rowprog_bf16
}

part_check() {
  run check 100 bash scripts/gpu_check.sh -rf
}

[ $# -ge 1 ] || { sed -n '2,17p' "$0"; exit 2; }
parts=()
for p in "$@"; do
  case "$p" in
    all) parts+=(gluon check) ;;
    gluon|check) parts+=("$p") ;;
    *) echo "gpu_open_work.sh: unknown part '$p' (gluon check all)" >&2; exit 2 ;;
  esac
done
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOGS/summary.txt"
for p in "${parts[@]}"; do
  START=$SECONDS
  "part_$p"
done
echo "failed commands: $failed" | tee -a "$LOGS/summary.txt"
exit "$failed"
