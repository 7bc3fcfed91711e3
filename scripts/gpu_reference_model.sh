#!/usr/bin/env bash
# Issue 17 (items 3 and 4) on a machine with a CUDA GPU: train the reference BlackMamba-like model with
# qmamba/calib/train.py, then its quality table and the 1-bit distillation budgets.
#
#   bash scripts/gpu_reference_model.sh train   [OUT]                 # the model, OUT/ref (default OUT: runs/ref19m)
#   bash scripts/gpu_reference_model.sh table   [OUT] [quant_table.py options]   # every format, OUT/table
#   bash scripts/gpu_reference_model.sh distill [OUT]                 # 1-bit: 60 / 180 / 600 s, with and without
#                                                                     # block matching, OUT/distill-<s>
#
# The model (about 19M parameters): d_model 256, 6 Mamba + 6 MoE layers of 8 gated-GELU experts (ffn 384), d_state
# 16, its own 8192-token byte-level BPE, trained on the text shipped with qmamba (corpus:train; held-out:
# corpus:heldout), seed 23. Settings (environment): QMAMBA_REF_STEPS [750], QMAMBA_REF_BATCH [16],
# QMAMBA_REF_SEQ_LEN [256], QMAMBA_REF_DEVICE [cuda], QMAMBA_REF_EVAL_TOKENS [0 = all of corpus:heldout],
# PYTHON [python3]. Any failed step stops the script with a non-zero exit status.
# A CPU dry run (seconds): QMAMBA_REF_STEPS=2 QMAMBA_REF_DEVICE=cpu QMAMBA_REF_EVAL_TOKENS=2048 \
#   bash scripts/gpu_reference_model.sh train /tmp/ref && ... table /tmp/ref --only "int4 g128 RTN"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WHAT=${1:?usage: bash scripts/gpu_reference_model.sh train|table|distill [OUT] [options]}
OUT=${2:-$ROOT/runs/ref19m}
shift $(( $# >= 2 ? 2 : 1 ))
DEVICE=${QMAMBA_REF_DEVICE:-cuda}
EVAL_TOKENS=${QMAMBA_REF_EVAL_TOKENS:-0}
MODEL="$OUT/ref"
mkdir -p "$OUT"

case "$WHAT" in
  train)
    cat > "$OUT/config.json" <<'EOF'
{"d_model": 256, "layers": ["r", "8", "r", "8", "r", "8", "r", "8", "r", "8", "r", "8"], "vocab_size": 8192,
 "ffn_hidden": 384, "d_state": 16, "final_norm": "layernorm", "family": "blackmamba"}
EOF
    rm -rf "$MODEL"
    "$PY" -m qmamba.calib.train --config "$OUT/config.json" --data corpus:train --eval-data corpus:heldout \
      --train-tokenizer 8192 --steps "${QMAMBA_REF_STEPS:-750}" --batch "${QMAMBA_REF_BATCH:-16}" \
      --seq-len "${QMAMBA_REF_SEQ_LEN:-256}" --warmup 50 --seed 23 --device "$DEVICE" --log-every 50 \
      --eval-windows 64 --out "$MODEL" 2>&1 | tee "$OUT/train.log"
    ;;
  table)
    "$PY" scripts/quant_table.py --model "$MODEL" --out "$OUT/table" --device "$DEVICE" --calib corpus \
      --eval-tokens "$EVAL_TOKENS" "$@" 2>&1 | tee "$OUT/table.log"
    ;;
  distill)
    for seconds in 60 180 600; do
      "$PY" scripts/quant_table.py --model "$MODEL" --out "$OUT/distill-$seconds" --device "$DEVICE" --calib corpus \
        --eval-tokens "$EVAL_TOKENS" --only "1-bit PTB + distill,1-bit PTB + block match + distill" --ste \
        --distill-steps 1000000 --distill-time "$seconds" "$@" 2>&1 | tee "$OUT/distill-$seconds.log"
    done
    ;;
  *)
    echo "error: unknown step '$WHAT' (train, table or distill)" >&2
    exit 2
    ;;
esac
