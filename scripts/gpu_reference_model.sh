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
# 16, its own 8192-token byte-level BPE, trained on the full pinned corpus (full:train, ~5.4M GPT-NeoX tokens; held-out:
# full:heldout), seed 23. The full corpus is found as qmamba finds it ($QMAMBA_DATA_DIR, else ../shared/data or
# shared/data in the checkout: copy it there to carry it to a lent GPU machine); without it the script stops, since
# the text shipped with qmamba (corpus:train, 347k tokens) is too small: 750 steps of 16 x 256 tokens pass over it nine
# times and the model memorises it (session 15: train loss 1.09, held-out perplexity 333). QMAMBA_REF_DATA=corpus
# trains on the shipped text anyway (a dry run). Settings (environment): QMAMBA_REF_STEPS [750], QMAMBA_REF_BATCH
# [16], QMAMBA_REF_SEQ_LEN [256], QMAMBA_REF_DEVICE [cuda], QMAMBA_REF_EVAL_TOKENS [65536; 0 = the whole held-out
# split], PYTHON [python3]. Any failed step stops the script with a non-zero exit status.
# A CPU dry run (a minute): QMAMBA_REF_DATA=corpus QMAMBA_REF_STEPS=2 QMAMBA_REF_DEVICE=cpu QMAMBA_REF_EVAL_TOKENS=2048 \
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
EVAL_TOKENS=${QMAMBA_REF_EVAL_TOKENS:-65536}
case "${QMAMBA_REF_DATA:-full}" in
  full)
    if ! found=$("$PY" -c "from qmamba.data_files import find_data_dir; print(find_data_dir())" 2>&1); then
      echo "${found##*$'\n'}" >&2
      echo "error: the reference model trains on the full corpus (QMAMBA_REF_DATA=corpus: the shipped text, a dry run)" >&2
      exit 2
    fi
    SPLIT=full ;;
  corpus) SPLIT=corpus ;;
  *) echo "error: QMAMBA_REF_DATA is full or corpus, not '$QMAMBA_REF_DATA'" >&2; exit 2 ;;
esac
MODEL="$OUT/ref"
mkdir -p "$OUT"

case "$WHAT" in
  train)
    cat > "$OUT/config.json" <<'EOF'
{"d_model": 256, "layers": ["r", "8", "r", "8", "r", "8", "r", "8", "r", "8", "r", "8"], "vocab_size": 8192,
 "ffn_hidden": 384, "d_state": 16, "final_norm": "layernorm", "family": "blackmamba"}
EOF
    rm -rf "$MODEL"
    "$PY" -m qmamba.calib.train --config "$OUT/config.json" --data "$SPLIT:train" --eval-data "$SPLIT:heldout" \
      --train-tokenizer 8192 --steps "${QMAMBA_REF_STEPS:-750}" --batch "${QMAMBA_REF_BATCH:-16}" \
      --seq-len "${QMAMBA_REF_SEQ_LEN:-256}" --warmup 50 --seed 23 --device "$DEVICE" --log-every 50 \
      --eval-windows 64 --out "$MODEL" 2>&1 | tee "$OUT/train.log"
    ;;
  table)
    "$PY" scripts/quant_table.py --model "$MODEL" --out "$OUT/table" --device "$DEVICE" --calib corpus \
      --data "$SPLIT:heldout" --eval-tokens "$EVAL_TOKENS" "$@" 2>&1 | tee "$OUT/table.log"
    ;;
  distill)
    for seconds in 60 180 600; do
      "$PY" scripts/quant_table.py --model "$MODEL" --out "$OUT/distill-$seconds" --device "$DEVICE" --calib corpus \
        --data "$SPLIT:heldout" --eval-tokens "$EVAL_TOKENS" --only "1-bit PTB + distill,1-bit PTB + block match + distill" --ste \
        --distill-steps 1000000 --distill-time "$seconds" "$@" 2>&1 | tee "$OUT/distill-$seconds.log"
    done
    ;;
  *)
    echo "error: unknown step '$WHAT' (train, table or distill)" >&2
    exit 2
    ;;
esac
