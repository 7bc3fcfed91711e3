#!/usr/bin/env bash
# The test command of the README: sets up the environment (first run) and runs the whole test suite on the CPU.
# Triton kernels run under the Triton interpreter (tests/qmamba/kernels sets TRITON_INTERPRET=1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(bash "$ROOT/scripts/setup_env.sh" test,export)
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
