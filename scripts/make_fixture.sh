#!/usr/bin/env bash
# Remake the trained tiny BlackMamba fixture at qmamba/assets/tiny-blackmamba (seeded, CPU, one thread so the
# floating-point reductions are the same on every run; about 15-20 minutes on an idle 2-core machine).
# Usage: scripts/make_fixture.sh [OUT_DIR]   (default: a fresh qmamba/assets/tiny-blackmamba.new, then moved into
# place, keeping the hand-written README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-qmamba/assets/tiny-blackmamba.new}"
rm -rf "$OUT"
OMP_NUM_THREADS=1 python -m qmamba.calib.train \
  --preset tiny-blackmamba-fixture \
  --data full:train \
  --eval-data corpus:heldout \
  --train-tokenizer 4096 \
  --steps 800 --seq-len 128 --batch 16 --lr 3e-3 --warmup 50 --weight-decay 0.1 --aux-coef 0.01 \
  --seed 0 --device cpu --threads 1 --save-dtype float16 \
  --out "$OUT"
if [ $# -eq 0 ]; then
  DEST=qmamba/assets/tiny-blackmamba
  mkdir -p "$DEST"
  for f in config.json manifest.json model.safetensors tokenizer.json; do mv -f "$OUT/$f" "$DEST/$f"; done
  rmdir "$OUT"
  echo "fixture written to $DEST"
fi
