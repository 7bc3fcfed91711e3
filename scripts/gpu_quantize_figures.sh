#!/usr/bin/env bash
# The GPU figures of the README ("Quantizing a large model on one GPU"): makes a random-weight BlackMamba-2.8B in
# the published layout (pytorch_model.bin + config.json, bf16), then quantizes it on the GPU with GPTQ int4 g128,
# AWQ int4 g128 and 1-bit PTB + distillation (--distill-time), calibrating on the text shipped with qmamba, and
# prints for each run its wall time (the whole command: load, calibration, writing), the calibration time qmamba
# records, the peak GPU memory (torch.cuda.max_memory_allocated) and the process's peak RAM. Any failed step
# stops the script with a non-zero exit status; no figure is printed for a run that failed.
#
#   bash scripts/gpu_quantize_figures.sh            # on a machine with a CUDA GPU (not in CI)
#
# Like scripts/gpu_check.sh it runs from the checkout (PYTHONPATH) with $PYTHON (default python3), which needs
# torch with CUDA and qmamba's dependencies. Settings (environment):
#   QMAMBA_FIGURES_OUT          work folder [runs/gpu-figures]; the 2.8B checkpoint (~5.6 GB) is made once there
#   QMAMBA_FIGURES_PRESET       [blackmamba-2.8b]     QMAMBA_FIGURES_DEVICE  [cuda]
#   QMAMBA_FIGURES_GROUP        int4 group size [128] QMAMBA_FIGURES_DISTILL_TIME  seconds of distillation [120]
#   QMAMBA_FIGURES_METHODS      runs to do, of: gptq awq distill [all three]
#   QMAMBA_FIGURES_CREATE_ARGS  extra `qmamba create` options; QMAMBA_FIGURES_QUANT_ARGS extra `qmamba quantize`
#                               options (e.g. "--nsamples 32"); the defaults are qmamba's (128 x 512 tokens)
# A dry run of the same commands on the CPU with a tiny model (seconds):
#   QMAMBA_FIGURES_PRESET=tiny-blackmamba-fixture QMAMBA_FIGURES_DEVICE=cpu QMAMBA_FIGURES_GROUP=64 \
#   QMAMBA_FIGURES_CREATE_ARGS="--tokenizer qmamba/assets/tiny-blackmamba/tokenizer.json" \
#   QMAMBA_FIGURES_QUANT_ARGS="--nsamples 8 --seq-len 64" QMAMBA_FIGURES_DISTILL_TIME=5 \
#   QMAMBA_FIGURES_OUT=/tmp/figures bash scripts/gpu_quantize_figures.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${QMAMBA_FIGURES_OUT:-$ROOT/runs/gpu-figures}
PRESET=${QMAMBA_FIGURES_PRESET:-blackmamba-2.8b}
DEVICE=${QMAMBA_FIGURES_DEVICE:-cuda}
GROUP=${QMAMBA_FIGURES_GROUP:-128}
DISTILL_TIME=${QMAMBA_FIGURES_DISTILL_TIME:-120}
METHODS=${QMAMBA_FIGURES_METHODS:-gptq awq distill}
read -r -a CREATE_ARGS <<< "${QMAMBA_FIGURES_CREATE_ARGS:-}"
read -r -a QUANT_ARGS <<< "${QMAMBA_FIGURES_QUANT_ARGS:-}"
MODEL="$OUT/$PRESET"
mkdir -p "$OUT"

"$PY" - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
line = f"torch {torch.__version__}"
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"error: --device {device} requested but torch sees no CUDA GPU")
    props = torch.cuda.get_device_properties(torch.device(device))
    line += f", {props.name}, {props.total_memory / 2**30:.1f} GiB"
print(line)
EOF

# qmamba CMD ARGS... with the wall time and the peak RAM of the process written to $TIMES (one JSON line)
TIMES="$OUT/times.jsonl"
: > "$TIMES"
timed() {
  local name=$1; shift
  echo "== qmamba $*"
  "$PY" - "$TIMES" "$name" "$@" <<'EOF'
import json, resource, subprocess, sys, time
times, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
t0 = time.perf_counter()
rc = subprocess.call([sys.executable, "-c", "import sys; from qmamba.cli import main; sys.argv[0] = 'qmamba'; main()",
                      *args])
wall = time.perf_counter() - t0
if rc != 0:
    sys.exit(f"error: {name} failed (exit status {rc})")
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
with open(times, "a") as f:
    f.write(json.dumps({"name": name, "wall_s": wall, "peak_rss_bytes": rss}) + "\n")
EOF
}

if [ ! -f "$MODEL/config.json" ]; then
  timed create create --preset "$PRESET" --format blackmamba -o "$MODEL" --overwrite ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
fi
timed info info "$MODEL"

for method in $METHODS; do
  case "$method" in
    gptq|awq) args=(--bits 4 --group-size "$GROUP" --method "$method") ;;
    distill) args=(--bits 1 --distill --distill-time "$DISTILL_TIME") ;;
    *) echo "error: unknown method '$method' in QMAMBA_FIGURES_METHODS (use gptq, awq, distill)" >&2; exit 2 ;;
  esac
  timed "$method" quantize "$MODEL" -o "$OUT/$PRESET-$method" "${args[@]}" --device "$DEVICE" --overwrite \
    --json "$OUT/$method.json" ${QUANT_ARGS[@]+"${QUANT_ARGS[@]}"}
done

"$PY" - "$OUT" "$TIMES" "$PRESET" $METHODS <<'EOF'
import json, sys
from pathlib import Path
out, times, preset, methods = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
runs = {r["name"]: r for r in map(json.loads, open(times))}
print(f"\n{preset}: wall = the whole qmamba command; calibration = qmamba's own record (after loading)")
print(f"{'run':<34} {'wall s':>8} {'calib s':>8} {'peak GPU GiB':>13} {'peak RAM GiB':>13}")
for method in methods:
    record = json.loads((out / f"{method}.json").read_text())
    gpu, distilled = record["peak_gpu_bytes"], record.get("distillation")
    if distilled:
        label = f"1-bit PTB + distill {distilled['options']['time_budget']:g} s ({distilled['steps']} steps)"
    else:
        label = f"{method.upper()} int{record['bits']} g{record['group_size']}"
    print(f"{label:<34} {runs[method]['wall_s']:>8.1f} {record['seconds']:>8.1f} "
          f"{'-' if gpu is None else format(gpu / 2**30, '.2f'):>13} {runs[method]['peak_rss_bytes'] / 2**30:>13.2f}")
EOF
