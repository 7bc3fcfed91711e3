#!/usr/bin/env bash
# Creates (once) a virtual environment with qmamba installed editable, and prints its path.
# Usage: source-free; `bash scripts/setup_env.sh [EXTRAS]`, e.g. `bash scripts/setup_env.sh test,export`.
#
# torch: a torch that this Python already has (a CUDA build, say) is reused through --system-site-packages and
# never replaced. Otherwise QMAMBA_TORCH_SPEC is installed (default torch==2.13.0: from PyPI that is the CUDA build
# on Linux; on machines whose pip has a local CPU wheel of that version, that wheel).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${QMAMBA_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] reusing the torch installed for $PY" >&2
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >&2 2>/dev/null || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${QMAMBA_TORCH_SPEC:-torch==2.13.0}" >&2
  "$VPY" -m pip install -q --disable-pip-version-check "${QMAMBA_TORCH_SPEC:-torch==2.13.0}" >&2
fi
SPEC="$ROOT"
[ -n "$EXTRAS" ] && SPEC="$ROOT[$EXTRAS]"
# editable install; the installed torch satisfies qmamba's requirement, so pip leaves it alone
"$VPY" -m pip install -q --disable-pip-version-check -e "$SPEC" >&2
echo "$VENV"
