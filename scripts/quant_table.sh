#!/usr/bin/env bash
# Reproduces the table of docs/quantization.md (CPU, a few minutes on 2 cores). Arguments go to quant_table.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-$ROOT/.venv/bin/python}" scripts/quant_table.py "$@"
