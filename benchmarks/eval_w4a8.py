"""What int8 activations cost in quality: held-out perplexity of an int4 model with the W4A8 GEMM's activation
quantization (:func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8_ref`: a per-token scale, round half up, [-127,
127]) emulated on the reference path, beside float and int4 (W4A16). CPU, no GPU needed.

The emulation replaces the input of every int4 matmul (dense linears and experts; or only the experts, or only the
dense ones) by its quantized-and-dequantized value, as the W4A8 kernel would multiply it: the kernel's output equals
that product up to float32 rounding (tests/qmamba/kernels/test_w4a8_gemm.py).

    python benchmarks/eval_w4a8.py [MODEL] [--method gptq|rtn] [--group-size 128] [--max-tokens 32768]
        [--seq-len 256] [--json OUT]

MODEL defaults to the built-in tiny BlackMamba (qmamba/assets); its int4 copy is made in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from qmamba import load_model
from qmamba.assets import default_model_path
from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
from qmamba.eval import evaluate_model
from qmamba.kernels.w4a8_gemm import int8_rounded_ref
from qmamba.quant.formats import Int4Format
from qmamba.quant.modules import QuantExperts, QuantLinear
from qmamba.tokenizer import resolve_tokenizer


@contextlib.contextmanager
def emulate_w4a8(dense: bool, experts: bool):
    """Within the block, int4 matmuls (``dense``: QuantLinear; ``experts``: QuantExperts' fc1 / fc2) multiply the
    int8-quantized activation (:func:`int8_rounded_ref`: quantized per row as the W4A8 kernel's quantizer does, and
    dequantized)."""
    linear_matmul, expert_matmul = QuantLinear._matmul, QuantExperts._expert_matmul

    def linear(self, x):
        return linear_matmul(self, int8_rounded_ref(x) if dense and isinstance(self.fmt, Int4Format) else x)

    def expert(self, x, name, e, int8_inputs=False):
        w = getattr(self, name)
        int4 = isinstance(getattr(w, "fmt", None), Int4Format)
        return expert_matmul(self, int8_rounded_ref(x) if experts and int4 else x, name, e, int8_inputs)

    QuantLinear._matmul, QuantExperts._expert_matmul = linear, expert
    try:
        yield
    finally:
        QuantLinear._matmul, QuantExperts._expert_matmul = linear_matmul, expert_matmul


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    src = Path(args.model) if args.model else default_model_path()
    tokenizer = resolve_tokenizer(src)
    torch.manual_seed(0)
    rows = {}

    def ppl(model, label):
        r = evaluate_model(model, tokenizer, data="corpus:heldout", seq_len=args.seq_len, max_tokens=args.max_tokens,
                           progress=False)
        rows[label] = r["perplexity"]["ppl"]
        print(f"{label:34s} perplexity {rows[label]:.4f}", flush=True)

    ppl(load_model(src), "float")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int4"
        quantize_checkpoint(src, out, QuantizeOptions(bits=4, group_size=args.group_size, method=args.method,
                                                      calib=["corpus"], nsamples=64, seq_len=256),
                            log=lambda *a, **k: None)
        int4 = load_model(out)
        ppl(int4, f"int4 g{args.group_size} {args.method} (W4A16)")
        for label, dense, experts in (("W4A8, every int4 matmul", True, True), ("W4A8, experts only", False, True),
                                      ("W4A8, dense int4 only", True, False)):
            with emulate_w4a8(dense, experts):
                ppl(int4, label)
    base = rows[f"int4 g{args.group_size} {args.method} (W4A16)"]
    for label, value in rows.items():
        print(f"{label:34s} {100 * (value / rows['float'] - 1):+7.3f}% vs float, {100 * (value / base - 1):+7.3f}% "
              "vs W4A16")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(src), args=vars(args), perplexity=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
