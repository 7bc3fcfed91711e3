#!/usr/bin/env bash
# GPU check (run on a machine with a CUDA GPU, not in CI): every kernel test compiled for the GPU, at
# BlackMamba-2.8B shapes where the tests have them, plus CUDA-graph replay == eager decode and the distilled 1-bit
# fixture's greedy tokens on the GPU, and router agreement of `qmamba eval --compare --device cuda`.
# One command:  bash scripts/gpu_check.sh [pytest args]   (in up to 16 pytest-xdist workers where xdist is installed)
# In parts that each fit a device call (the whole check took 400-480 s on the lent H100 in sessions 48-49, near the
# 600 s limit of a call):  bash scripts/gpu_check.sh -rf --shard 1/2, then --shard 2/2 (tests/conftest.py: every
# second test in collection order; the two parts together are the whole check)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export QMAMBA_TEST_DEVICE=cuda TRITON_INTERPRET=0  # explicit 0: compiled kernels even if the caller set 1
# the checkout itself is importable (qmamba/ holds every subpackage): put it first on the path, no install needed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
# default test paths unless a path is given (options alone, e.g. -x, keep the defaults). A path is an argument that
# names a file or folder (a test id's part before '::'): an option's value, like the 1/2 of `--shard 1/2` or the
# expression of `-k EXPR`, is not one (session 50's check took any argument not starting with '-' for a path, so
# `--shard 1/2` dropped the defaults and ran the whole tests/ tree on the GPU: session 51's two calls timed out)
paths=0; for a in "$@"; do case "$a" in -*) ;; *) [ -e "${a%%::*}" ] && paths=1 ;; esac; done
if [ $paths -eq 0 ]; then
  # the last one calibrates on the text shipped in qmamba/assets/data (no data directory needed)
  set -- tests/qmamba/kernels tests/qmamba/test_fused_step.py tests/qmamba/test_model_decode.py \
    tests/qmamba/test_router_agreement.py tests/qmamba/test_graph_prefill.py tests/qmamba/test_bench.py \
    tests/qmamba/calib/test_binarize_distill.py::test_distilled_fixture_greedy_tokens_on_gpu "$@"
fi
# the tests are bound by Triton compiles on the host: spread them over worker processes where pytest-xdist is
# installed (QMAMBA_GPU_CHECK_WORKERS, default: the host's cores, at most 16; 0 or an explicit -n keeps the caller's
# choice). The lent H100's 16 cores ran the whole check in 338 s with 16 workers (session 37; 8 workers: over 420 s)
cores=$(nproc 2>/dev/null || echo 8)
workers=${QMAMBA_GPU_CHECK_WORKERS:-$(( cores < 16 ? cores : 16 ))}
case " $* " in *" -n "*|*" -n"[0-9]*) workers=0 ;; esac
if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  set -- -n "$workers" "$@"
fi
# the slowest tests named at the end, and the stacks of any test still running after 240 s dumped (a hang shows
# where it is; session 49's first call ran out of time with nothing to show why)
# each failure's test id written as it happens (tests/conftest.py), where the summary at the end may never come (a call
# cut off by its time limit): QMAMBA_FAILURES_LOG, by default $OUT/gpu_check_failures.txt on the device machine
export QMAMBA_FAILURES_LOG=${QMAMBA_FAILURES_LOG:-${OUT:+$OUT/gpu_check_failures.txt}}
exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 -o faulthandler_timeout=240 "$@"
