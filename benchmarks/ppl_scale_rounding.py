"""What ``MatmulPolicy.plane_code_pairs`` "scaled" costs in accuracy: the int4 group scales (stored in float16)
rounded to bfloat16, as the scaled pairs multiply by them, measured as perplexity on the CPU (no GPU needed).

    python benchmarks/ppl_scale_rounding.py [--model qmamba/assets/tiny-blackmamba] [--max-tokens all] [--out DIR]

Three checkpoints are evaluated with ``qmamba eval`` (float32 reference path, the shipped held-out text): the float
model, ``qmamba quantize --bits 4 --group-size 128 --method rtn --quantize-xdt --quantize-head`` of it (every
projection in int4, so that every matrix the pairs could touch is quantized), and the same checkpoint with its
scales rounded to bfloat16 (``scales.to(bfloat16).to(float16)`` in ``model.safetensors``). The rounding is the
only difference between the last two; the scaled pairs also round each weight to bfloat16, as the bf16 model's
dequantized weights are anyway. Exits non-zero if a command fails or a perplexity is not finite.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def qmamba(*args: str) -> str:
    run = subprocess.run([sys.executable, "-c", "from qmamba.cli import main; main()", *args], capture_output=True,
                         text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"error: qmamba {' '.join(args)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return run.stdout + run.stderr


def perplexity(path: Path, max_tokens: str) -> float:
    out = qmamba("eval", str(path), "--max-tokens", max_tokens, "--no-progress")
    found = re.search(r"perplexity ([0-9.]+|nan|inf)", out)
    if not found or not math.isfinite(float(found.group(1))):
        sys.exit(f"error: no finite perplexity in:\n{out[-2000:]}")
    return float(found.group(1))


def round_scales(path: Path) -> int:
    """Round every float16 ``*.scales`` tensor of ``path/model.safetensors`` to bfloat16 and back, in place."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    names = [k for k, v in tensors.items() if k.endswith("scales") and v.dtype == torch.float16]
    for k in names:
        tensors[k] = tensors[k].to(torch.bfloat16).to(torch.float16)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return len(names)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "qmamba" / "assets" / "tiny-blackmamba"))
    ap.add_argument("--max-tokens", default="all", help="held-out tokens to evaluate (a count or 'all')")
    ap.add_argument("--out", help="folder for the two quantized checkpoints (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        exact, rounded = base / "int4_g128", base / "int4_g128_bf16_scales"
        qmamba("quantize", args.model, "-o", str(exact), "--bits", "4", "--group-size", "128", "--method", "rtn",
               "--quantize-xdt", "--quantize-head")
        qmamba("quantize", args.model, "-o", str(rounded), "--bits", "4", "--group-size", "128", "--method", "rtn",
               "--quantize-xdt", "--quantize-head")
        n = round_scales(rounded)
        if n == 0:
            sys.exit("error: no float16 scales found to round")
        rows = [("float", perplexity(Path(args.model), args.max_tokens)),
                ("int4 g128 (fp16 scales)", perplexity(exact, args.max_tokens)),
                (f"int4 g128, {n} scale tensors rounded to bf16", perplexity(rounded, args.max_tokens))]
    for name, ppl in rows:
        print(f"{name:46s} perplexity {ppl:.4f}")
    loss = rows[1][1] - rows[0][1]
    print(f"scale rounding: {rows[2][1] - rows[1][1]:+.4f} perplexity ({(rows[2][1] - rows[1][1]) / loss:+.1%} of the "
          f"int4 loss, {loss:+.4f})" if loss else "int4 loss is zero")


if __name__ == "__main__":
    main()
