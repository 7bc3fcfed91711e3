"""The W4A8 GEMM candidate (:mod:`qmamba.kernels.w4a8_gemm`: int4 g128 weights, int8 activations, int8 tensor cores)
against cuBLAS bf16 and the runtime's int4 matmul (``dequant_matmul`` on plane words, as the prefill runs it) at
BlackMamba-2.8B's matrix shapes and prefill sizes. Every output is checked before anything is timed:

* the activation quantizer against its PyTorch twin (codes equal, scales and tile sums equal);
* the W4A8 GEMM against ``w4a8_gemm_ref`` (the dequantized activation times the dequantized weight, float32);
* the runtime's int4 matmul against the float product with the dequantized weight.

It also prints the W4A8 output's error against the unquantized activation's product (what int8 activations cost,
for information). Timing: CUDA graphs over rotating weight copies (``timing.py``), us a call; ``w4a8`` is the
quantizer plus the GEMM, ``w4a8_gemm`` the GEMM alone. Exits 1 when a check fails.

    python benchmarks/bench_w4a8.py [--m 256,512,2048] [--shapes in_proj,out_proj,fc1,fc2]
        [--tiles 64x128x4x3,64x128x4x3m,128x128x8x3] [--json OUT]

Without a GPU it runs the checks only (``--m`` small, the interpreter), for CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_linear import clones  # noqa: E402
from timing import EAGER_FALLBACKS, copies_for, time_calls, require_idle_gpu  # noqa: E402

from qmamba.kernels.quant_matmul import dequant_matmul  # noqa: E402
from qmamba.kernels.w4a8_gemm import (quantize_rows_int8, quantize_rows_int8_ref, w4a8_gemm,  # noqa: E402
                                      w4a8_gemm_ref)
from qmamba.quant.formats import Int4Format  # noqa: E402

SHAPES = {"in_proj": (1472, 5888), "out_proj": (2944, 1472), "fc1": (1472, 7744), "fc2": (3872, 1472)}  # (K, N)


def rel_err(out, ref) -> float:
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    return err if err == err else float("inf")


def parse_tile(spec: str) -> dict:
    """``BMxBNxWARPSxSTAGES``, then letters: ``m`` for the magic-number conversion (``w4a8_gemm``'s ``magic``), ``l``
    for the product taken as ``W x^T`` (``weight_left``)."""
    body = spec.rstrip("ml")
    flags = spec[len(body):]
    bm, bn, nw, ns = (int(v) for v in body.split("x"))
    return dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, magic="m" in flags, weight_left="l" in flags)


def bench_shape(name, k, n, m, tiles, dev, timing: bool) -> tuple[dict, list[str]]:
    fails = []
    fmt = Int4Format(128)
    w = torch.randn(1, n, k, device="cpu") / k ** 0.5
    planes = fmt.kernel_weight(fmt.quantize_rtn(w), n, k).to_planes()
    planes = type(planes)(**{f: (v.to(dev) if isinstance(v, torch.Tensor) else v) for f, v in vars(planes).items()})
    k_pad = planes.qweight.shape[-1] * 8
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    row = dict(shape=name, k=k, n=n, m=m)
    # -- checks
    codes, scale, sums = quantize_rows_int8(x, k_pad)
    rc, rs, rsu = quantize_rows_int8_ref(x, k_pad)
    if not (torch.equal(codes, rc) and torch.allclose(scale, rs, rtol=1e-6) and torch.equal(sums, rsu)):
        fails.append(f"{name} M={m}: the activation quantizer differs from its twin")
    ref = w4a8_gemm_ref(codes, scale, planes)
    exact = x.float() @ planes.dequantized(torch.float32)[0].t()
    for spec in tiles:
        y = w4a8_gemm(codes, scale, sums, planes, out=torch.empty(m, n, device=dev, dtype=x.dtype), **parse_tile(spec))
        err = rel_err(y, ref)
        row[f"err_{spec}"] = err
        if err > (1e-2 if x.dtype == torch.bfloat16 else 1e-5):
            fails.append(f"{name} M={m} tile {spec}: W4A8 output off its reference by {err:.2e}")
    row["act_quant_err"] = rel_err(ref, exact)
    y_int4 = dequant_matmul(x, planes)
    err = rel_err(y_int4, exact)  # x @ W_hat: the runtime's int4 matmul
    row["err_int4"] = err
    if err > 2e-2:
        fails.append(f"{name} M={m}: the runtime's int4 matmul off its reference by {err:.2e}")
    if not timing or fails:
        return row, fails
    # -- timings (us a call, weight copies rotated out of L2)
    per_copy = planes.qweight.numel() * 4
    copies = clones(planes, per_copy)
    w_bf16 = [copies[i % len(copies)].dequantized(torch.bfloat16)[0] for i in range(copies_for(2 * n * k))]
    row["cublas_bf16"] = time_calls([lambda wb=wb: x @ wb.t() for wb in w_bf16])
    row["int4_runtime"] = time_calls([lambda c=c: dequant_matmul(x, c) for c in copies])
    out = torch.empty(m, n, device=dev, dtype=x.dtype)
    for spec in tiles:
        cfg = parse_tile(spec)
        row[f"w4a8_gemm_{spec}"] = time_calls([lambda c=c: w4a8_gemm(codes, scale, sums, c, out=out, **cfg)
                                               for c in copies])
    best = min(tiles, key=lambda s: row[f"w4a8_gemm_{s}"])
    row["best_tile"] = best
    row["w4a8_gemm"] = row[f"w4a8_gemm_{best}"]
    cfg = parse_tile(best)

    def both(c):
        q = quantize_rows_int8(x, k_pad)
        return w4a8_gemm(*q, c, out=out, **cfg)
    row["w4a8"] = time_calls([lambda c=c: both(c) for c in copies])
    return row, fails


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="256,512,2048")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tiles", default="64x128x4x3,64x128x4x3l,64x128x4x3lm,128x128x8x3l,128x128x8x3lm,"
                                       "128x128x8x4l,64x256x8x3l")
    ap.add_argument("--json", default=None)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        print(f"error: unknown shapes {sorted(unknown)} (known: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    try:
        [parse_tile(t) for t in args.tiles.split(",")]
    except ValueError:
        print(f"error: --tiles wants BMxBNxWARPSxSTAGES[m][l] entries, got {args.tiles!r}", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timing = dev.type == "cuda"
    if timing:
        require_idle_gpu()
        print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    torch.manual_seed(0)
    tiles = args.tiles.split(",")
    rows, fails = [], []
    for m in (int(v) for v in args.m.split(",")):
        for name in args.shapes.split(","):
            k, n = SHAPES[name]
            row, bad = bench_shape(name, k, n, m, tiles, dev, timing)
            rows.append(row)
            fails += bad
            for f in bad:
                print("FAIL:", f, flush=True)
            line = f"{name:9s} M={m:5d} act-quant err {row['act_quant_err']:.2e}"
            if "w4a8" in row:
                line += (f"  cuBLAS bf16 {row['cublas_bf16']:8.2f} us  int4 runtime {row['int4_runtime']:8.2f}  "
                         f"W4A8 gemm {row['w4a8_gemm']:8.2f} ({row['best_tile']}), with quantizer {row['w4a8']:8.2f}"
                         f"  -> {row['cublas_bf16'] / row['w4a8']:.2f}x cuBLAS, "
                         f"{row['int4_runtime'] / row['w4a8']:.2f}x int4 runtime")
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, fails=fails, eager_fallbacks=EAGER_FALLBACKS), indent=1))
    if fails:
        print(f"{len(fails)} check(s) failed: no figure above them is a result", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
