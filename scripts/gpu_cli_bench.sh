#!/usr/bin/env bash
# Issue 12's CLI figures: what a user gets from the commands alone. Makes a random-weight BlackMamba checkpoint in
# the published layout (bf16), quantizes it with `qmamba quantize` (int4 g128, RTN with --report: the layout and the
# speed of the default GPTQ, without its calibration time; the report runs the int8-activation check that decides
# the W4A8 prefill, as GPTQ's does, and `qmamba info` shows the decision) twice: with quantize's defaults (x_proj, dt_proj and lm_head stay
# float) and with --quantize-xdt --quantize-head (every projection int4, as benchmarks/bench_decode.py measures),
# and, as "b1", 1-bit (`--bits 1`: PTB, no data), then runs `qmamba bench` on them (every decode figure checked against the reference path first; the
# prefill eagerly, as `qmamba generate` runs it, and as CUDA-graph chunks) and prints one table. Any failed step
# stops the script with a non-zero exit status.
#
#   bash scripts/gpu_cli_bench.sh                 # on a machine with a CUDA GPU (not in CI)
#
# Runs from the checkout (PYTHONPATH) with $PYTHON (default python3). Settings (environment):
#   QMAMBA_CLI_OUT     work folder [runs/gpu-cli]; the bf16 checkpoint is made once there
#   QMAMBA_CLI_PRESET  [blackmamba-2.8b]   QMAMBA_CLI_DEVICE [cuda]   QMAMBA_CLI_BATCH [1,8]
#   QMAMBA_CLI_PROMPT  prompt tokens [2048]   QMAMBA_CLI_TOKENS decode steps timed [256]
#   QMAMBA_CLI_GROUP   int4 group size [128]   QMAMBA_CLI_REPORT quantize's report of the int4 runs [--report]
#   QMAMBA_CLI_NAMES   checkpoints to make and bench, of bf16 int4 int4-all b1 ["bf16 int4 int4-all"]
#   QMAMBA_CLI_PREFILLS prefill modes, of eager graph ["eager graph" on CUDA, "eager" elsewhere]
# A dry run of the same commands on the CPU with a tiny model (a minute; no graph prefill there):
#   QMAMBA_CLI_PRESET=tiny-blackmamba QMAMBA_CLI_DEVICE=cpu QMAMBA_CLI_GROUP=32 QMAMBA_CLI_PROMPT=32 \
#   QMAMBA_CLI_TOKENS=4 QMAMBA_CLI_BATCH=1,2 QMAMBA_CLI_OUT=/tmp/cli QMAMBA_CLI_REPORT=--no-report \
#   bash scripts/gpu_cli_bench.sh   (the tiny preset's random vocabulary has no tokenizer for the report's text)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${QMAMBA_CLI_OUT:-$ROOT/runs/gpu-cli}
PRESET=${QMAMBA_CLI_PRESET:-blackmamba-2.8b}
DEVICE=${QMAMBA_CLI_DEVICE:-cuda}
BATCH=${QMAMBA_CLI_BATCH:-1,8}
PROMPT=${QMAMBA_CLI_PROMPT:-2048}
TOKENS=${QMAMBA_CLI_TOKENS:-256}
GROUP=${QMAMBA_CLI_GROUP:-128}
REPORT=${QMAMBA_CLI_REPORT:---report}
mkdir -p "$OUT"

qmamba() {
  echo "== qmamba $*" >&2
  "$PY" -c "import sys; from qmamba.cli import main; sys.argv[0] = 'qmamba'; main()" "$@"
}

BF16="$OUT/$PRESET-bf16"
if [ ! -f "$BF16/config.json" ]; then
  qmamba create --preset "$PRESET" --format blackmamba -o "$BF16" --overwrite
fi
read -r -a names <<<"${QMAMBA_CLI_NAMES:-bf16 int4 int4-all}"
for name in "${names[@]}"; do
  case "$name" in
    bf16) ;;
    int4) qmamba quantize "$BF16" -o "$OUT/$PRESET-int4" --bits 4 --group-size "$GROUP" --method rtn "$REPORT" \
            --device "$DEVICE" --overwrite ;;
    int4-all) qmamba quantize "$BF16" -o "$OUT/$PRESET-int4-all" --bits 4 --group-size "$GROUP" --method rtn \
                "$REPORT" --device "$DEVICE" --quantize-xdt --quantize-head --overwrite ;;
    b1) qmamba quantize "$BF16" -o "$OUT/$PRESET-b1" --bits 1 --device "$DEVICE" --overwrite ;;
    *) echo "gpu_cli_bench.sh: unknown checkpoint name '$name' (bf16 int4 int4-all b1)" >&2; exit 2 ;;
  esac
done

prefills=(eager)
case "$DEVICE" in cuda*) prefills+=(graph) ;; esac
if [ -n "${QMAMBA_CLI_PREFILLS:-}" ]; then read -r -a prefills <<<"$QMAMBA_CLI_PREFILLS"; fi
for name in "${names[@]}"; do
  for prefill in "${prefills[@]}"; do
    qmamba bench "$OUT/$PRESET-$name" --batch "$BATCH" --prompt-len "$PROMPT" --tokens "$TOKENS" --device "$DEVICE" \
      --prefill "$prefill" --json "$OUT/bench-$name-$prefill.json"
  done
done

"$PY" - "$OUT" "$PRESET" "${names[*]}" "${prefills[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, preset, names, prefills = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4:]
print(f"\n{preset}: qmamba bench (decode checked first); prefill tok/s " + " / ".join(prefills))
print("| checkpoint | batch | prefill tok/s | decode ms/token | peak GB | weights GB |")
print("|---|---:|---:|---:|---:|---:|")
for name in names:
    runs = {p: json.loads((out / f"bench-{name}-{p}.json").read_text())["rows"] for p in prefills}
    for i, row in enumerate(runs[prefills[0]]):
        prefill = " / ".join(f"{runs[p][i]['prefill_tok_s']:,.0f}" for p in prefills)
        peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}"
        print(f"| {name} | {row['batch']} | {prefill} | {row['decode_ms_per_token']:.3f} | {peak} | "
              f"{row['weight_gb']:.2f} |")
EOF
