#!/usr/bin/env bash
# The main job on the built-in default model (or on the checkpoint given as $1):
#   info -> int4 GPTQ quantization with calibration on the train text shipped with qmamba -> perplexity fp vs
#   int4 on the held-out text shipped with qmamba -> generation -> ONNX export of the int4 model -> generation
#   with onnxruntime. All data is inside the package (qmamba/assets/data): no download, no data directory.
# Set-up (virtual environment, install) happens on the first run. Outputs go to runs/demo/ (QMAMBA_DEMO_OUT).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(bash "$ROOT/scripts/setup_env.sh" export)
export PATH="$VENV/bin:$PATH"
MODEL=${1:-$(python -c "import qmamba.assets as a; print(a.default_model_path())")}
OUT=${QMAMBA_DEMO_OUT:-$ROOT/runs/demo}
GROUP=${QMAMBA_DEMO_GROUP:-64}
PROMPT=${QMAMBA_DEMO_PROMPT:-"ROMEO: But soft, what light"}
mkdir -p "$OUT"

echo "== qmamba info $MODEL"
qmamba info "$MODEL"

echo "== quantize: int4 g$GROUP GPTQ, calibration on the train text shipped with qmamba"
qmamba quantize "$MODEL" -o "$OUT/int4-gptq" --bits 4 --group-size "$GROUP" --method gptq \
  --calib corpus --nsamples 64 --seq-len 256 --overwrite

echo "== held-out perplexity (text shipped with qmamba): float vs int4"
qmamba eval --compare "$MODEL" "$OUT/int4-gptq" --data corpus:heldout --seq-len 256 --max-tokens 32768 \
  --json "$OUT/eval.json"

echo "== generate (int4, greedy)"
qmamba generate "$OUT/int4-gptq" --prompt "$PROMPT" -n 48 -t 0

echo "== export the int4 model to ONNX and generate with onnxruntime"
qmamba export "$OUT/int4-gptq" -o "$OUT/int4-gptq.onnx" --overwrite
qmamba generate "$OUT/int4-gptq.onnx" --prompt "$PROMPT" -n 48 -t 0
echo "== done: outputs in $OUT"
