#!/usr/bin/env bash
# onnxruntime-gpu on the lent GPU machine, which cannot download: the package travels in parts (.whl-ort/<pack>/,
# git-ignored, one part per device call, see scripts/ort_gpu_setup.md), is put together there and unpacked to
# /tmp/site, which shadows the CPU onnxruntime installed there.
#   bash scripts/ort_gpu_setup.sh stash     # copy the carried part(s) to /tmp/ort-parts (survives while warm)
#   bash scripts/ort_gpu_setup.sh install   # stash; all parts there: check sha256, unpack to /tmp/site, verify
#   bash scripts/ort_gpu_setup.sh verify    # CUDA provider available and running (scripts/ort_gpu_verify.py)
#   eval "$(bash scripts/ort_gpu_setup.sh env)"   # PYTHONPATH and LD_LIBRARY_PATH for using it
# ORT_PACK=sm90 (default, 2 parts: onnxruntime-gpu 1.31.1 with the GPU code of other architectures than sm_90
# zeroed) or ORT_PACK=full (4 parts: the unmodified 1.31.1 wheel contents, recompressed).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PACK=${ORT_PACK:-sm90}
case "$PACK" in
  sm90) SHA=74a4978d1de9578757e5341448084f85dc935d722d0fe7aaa9608046390a4982; PARTS=2 ;;
  full) SHA=b824b6e0377b9c8388dd43101464670d4c611c2b9fad6839918f42e0c9c435ff; PARTS=4 ;;
  *) echo "error: ORT_PACK must be sm90 or full, got $PACK" >&2; exit 2 ;;
esac
NAME=ort-gpu-1.31.1-$PACK.tar.xz
PARTDIR=/tmp/ort-parts
SITE=${ORT_SITE:-/tmp/site}
PY=${PYTHON:-python3}
MARKER=$SITE/.qmamba-$NAME.$SHA

stash() {
  mkdir -p "$PARTDIR"
  for f in "$ROOT/.whl-ort/$PACK/$NAME".part-*; do
    [ -f "$f" ] || continue
    cp "$f" "$PARTDIR/" && echo "stashed $(basename "$f") ($(stat -c %s "$f") bytes)"
  done
  echo "parts of $NAME on this machine: $(ls "$PARTDIR" 2>/dev/null | grep -c "^$NAME.part-") of $PARTS"
}

nvidia_libs() {  # the lib folders of the nvidia-* wheels (torch's CUDA libraries), colon-separated
  "$PY" -c "import pathlib, sys
dirs = [str(p) for e in sys.path for p in sorted(pathlib.Path(e or '.').glob('nvidia/*/lib'))]
print(':'.join(dict.fromkeys(dirs)))"
}

env_lines() {
  local libs
  libs=$(nvidia_libs)
  if [ -f "$MARKER" ]; then echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"; fi
  if [ -n "$libs" ]; then echo "export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"; fi
}

verify() {
  echo "== with LD_LIBRARY_PATH set to the nvidia-* wheel folders"
  (eval "$(env_lines)"; PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" "$PY" "$ROOT/scripts/ort_gpu_verify.py") \
    || return 1
  echo "== without LD_LIBRARY_PATH (qmamba's preload_cuda_libraries alone; information only)"
  (eval "$(env_lines)"; unset LD_LIBRARY_PATH; PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" \
    "$PY" "$ROOT/scripts/ort_gpu_verify.py" --quiet) || echo "(needs LD_LIBRARY_PATH: scripts/ort_gpu_check.sh sets it)"
  return 0
}

install() {
  stash
  if [ -f "$MARKER" ]; then echo "$NAME already unpacked in $SITE"; verify; return; fi
  local have missing=""
  have=$(ls "$PARTDIR" 2>/dev/null | grep -c "^$NAME.part-")
  if [ "$have" -ne "$PARTS" ]; then
    for i in $(seq 0 $((PARTS - 1))); do
      p=$(printf "%s.part-%02d" "$NAME" "$i"); [ -f "$PARTDIR/$p" ] || missing="$missing $p"
    done
    echo "error: $have of $PARTS parts of $NAME on this machine; missing:$missing. A fresh machine starts bare:" \
      "carry the missing parts again (one per call, while the machine stays warm)" >&2
    return 1
  fi
  cat "$PARTDIR/$NAME".part-* > "/tmp/$NAME" || return 1
  if ! echo "$SHA  /tmp/$NAME" | sha256sum -c --quiet; then
    echo "error: $NAME put together from $PARTDIR does not match its sha256; carry the parts again" >&2
    rm -f "/tmp/$NAME"; return 1
  fi
  mkdir -p "$SITE"
  "$PY" -c "import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter='data')" "/tmp/$NAME" "$SITE" || return 1
  rm -f "/tmp/$NAME"
  touch "$MARKER"
  echo "unpacked $NAME into $SITE ($(du -sh "$SITE" | cut -f1))"
  verify
}

case "${1:-}" in
  stash) stash ;;
  install) install ;;
  verify) verify ;;
  env) env_lines ;;
  *) echo "usage: bash scripts/ort_gpu_setup.sh stash|install|verify|env" >&2; exit 2 ;;
esac
