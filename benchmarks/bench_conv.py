"""The prefill's causal depthwise conv (``qmamba.kernels.causal_conv1d.causal_conv1d_triton``) by tile, side by side
in one run, at BlackMamba-2.8B's shape (d_inner 2944, width 4, SiLU, a carried state), with the time as a share
of its memory floor.

    python benchmarks/bench_conv.py [--batches 1,8] [--lengths 2048] [--tiles 16x128w4,64x128w4,...] [--json OUT]

A tile is ``BLOCK_LxBLOCK_DwWARPS`` (``default``: the kernel's own). The input is the first half of in_proj's
``[B, L, 2 d_inner]`` output, as the mixer passes it (strided rows). Every variant is compared with
``causal_conv1d_ref`` (fp32 math, the same bf16 inputs) before it is timed: y within 1e-2 relative (bf16 rounding),
the final state exactly; a failed check exits 1. Floor: bytes read (x, weight, bias, state) + written (y, final
state) over the copy bandwidth measured in the run. Timing: benchmarks/timing.py (CUDA-graph replay, median).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from qmamba.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copies_for, copy_bandwidth, require_idle_gpu, time_calls  # noqa: E402

D_INNER, WIDTH = 2944, 4
DEFAULT_TILES = "default,16x128w4,32x128w4,64x128w4,64x64w4,128x64w4,32x256w8,64x256w8"


def parse_tile(spec: str) -> dict:
    """``default`` -> {}; ``64x128w4`` -> block_l, block_d, num_warps (else exit with the expected form)."""
    if spec == "default":
        return {}
    found = re.fullmatch(r"(\d+)x(\d+)w(\d+)", spec.strip())
    if not found:
        sys.exit(f"error: tile {spec!r} is not BLOCK_LxBLOCK_DwWARPS (e.g. 64x128w4) or 'default'")
    bl, bd, w = (int(v) for v in found.groups())
    return dict(block_l=bl, block_d=bd, num_warps=w)


def conv_inputs(batch, length, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    xz = torch.randn(batch, length, 2 * D_INNER, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(D_INNER, WIDTH, generator=g, device=device) / 2).to(torch.bfloat16)
    b = (torch.randn(D_INNER, generator=g, device=device) / 4).to(torch.bfloat16)
    s = torch.randn(batch, D_INNER, WIDTH, generator=g, device=device).to(torch.bfloat16)
    return xz[..., :D_INNER], w, b, s


def check(knobs: dict, batch: int, length: int, device) -> float:
    """Relative y error against the reference; raises where the final state differs."""
    x, w, b, s = conv_inputs(batch, length, device, seed=1)
    y, f = causal_conv1d_triton(x, w, b, s, **knobs)
    y_ref, f_ref = causal_conv1d_ref(x, w, b, s)
    if not torch.equal(f, f_ref):
        raise AssertionError("final state differs from the reference's")
    return float((y.float() - y_ref.float()).norm() / y_ref.float().norm())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--tiles", default=DEFAULT_TILES)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="checks only, tiny shapes (CPU: TRITON_INTERPRET=1)")
    args = ap.parse_args()
    tiles = {t: parse_tile(t) for t in args.tiles.split(",") if t}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        require_idle_gpu()
        bandwidth = copy_bandwidth()
        print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    elif not args.quick:
        sys.exit("error: timing needs a CUDA device (--quick runs the checks on the CPU)")
    rows, failed = [], False
    shapes = [(1, 24), (2, 9)] if args.quick else [(int(b), int(n)) for b in args.batches.split(",")
                                                   for n in args.lengths.split(",")]
    for batch, length in shapes:
        for name, knobs in tiles.items():
            if args.quick:
                knobs = {k: (min(v, 16) if k != "num_warps" else 1) for k, v in knobs.items()}
            try:
                err = check(knobs, batch, length, device)
                ok = err < 1e-2
            except AssertionError as exc:
                err, ok = float("nan"), False
                print(f"error: {name} at B={batch} L={length}: {exc}", file=sys.stderr)
            row = dict(batch=batch, length=length, tile=name, rel_err=err, check_ok=ok)
            if not ok:
                failed = True
                print(f"error: {name} at B={batch} L={length}: y relative error {err:.2e}", file=sys.stderr)
            elif not args.quick:
                inputs = [conv_inputs(batch, length, device, seed=i)
                          for i in range(copies_for(4 * batch * length * D_INNER))]
                us = time_calls([lambda i=i: causal_conv1d_triton(*i, **knobs) for i in inputs])
                n_bytes = 2 * batch * (2 * length * D_INNER + 2 * D_INNER * WIDTH) + 2 * D_INNER * (WIDTH + 1)
                row.update(us=us, floor_us=n_bytes / bandwidth * 1e6)
                print(f"B={batch} L={length:5d} {name:12s} {us:8.1f} us  {100 * row['floor_us'] / us:5.1f}% of floor"
                      f"  (y rel err {err:.1e})", flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
