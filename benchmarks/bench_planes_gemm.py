"""The general int4 matmuls on plane words against the stored word layout and bf16 (issue 13's table), at the
BlackMamba-2.8B shapes and M = 2..2048: dense projections beside cuBLAS, and the routed expert stacks (8 experts,
top-1, tokens spread at random) beside our float (bf16) expert kernel, which is what the bf16 model runs.

    python benchmarks/bench_planes_gemm.py --out planes.json [--m 2,4,8,16,64,256,2048] [--sweep] [--quick]
        [--parts dense,experts] [--expert-tiles 64x128w4s3,...] [--unpacks float,int,wleft,pairs,pairs_scaled]

Every variant's output is compared with x @ the dequantized weight (fp32) before it is timed; a variant that
disagrees is an error (exit 1), never a figure. Method: benchmarks/timing.py (CUDA-graph replay, weight copies
rotated past the L2, median). ``--sweep`` also times the small-M kernel's tiles at 2 <= M <= 16 (batched decode:
block_n, split-K, warps) and a grid of GEMM tiles for the plane kernel at M >= 64 (for the
expert stacks: each tile with the codes unpacked as floats and as integers, as W x^T, and two at a time:
``MatmulPolicy.plane_float_codes``, ``plane_weight_left``, ``plane_code_pairs`` and ``plane_gemm_code_pairs``).
On the CPU (``TRITON_INTERPRET=1``) ``--quick`` runs the same checks on tiny shapes without timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copies_for, time_calls, require_idle_gpu  # noqa: E402

from qmamba.kernels.matmul_configs import MatmulConfig, MatmulPolicy, gemm_config  # noqa: E402
from qmamba.kernels.quant_matmul import dequant_matmul  # noqa: E402
from qmamba.kernels.routing import expert_tile_map  # noqa: E402
from qmamba.kernels.weights import PackedWeight  # noqa: E402
from qmamba.quant.formats import Int4Format  # noqa: E402

DENSE = [("in_proj", 1472, 5888), ("x_proj", 2944, 124), ("out_proj", 2944, 1472), ("head", 1472, 50304)]
EXPERTS = [("fc1 x8", 1472, 7744), ("fc2 x8", 3872, 1472)]
DENSE_SWEEP = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 256, 8, 3), (64, 256, 8, 3), (128, 128, 4, 4),
               (64, 64, 4, 4)]  # the dense sweep at M >= 64 unless --expert-tiles are given
EXPERT_SWEEP = [(64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (64, 64, 4, 2),
                (64, 128, 8, 3)]  # (block_m, block_n, warps, stages)
# how the plane GEMM unpacks and multiplies: name -> (MatmulPolicy.plane_float_codes, plane_weight_left,
# plane_code_pairs and plane_gemm_code_pairs)
UNPACKS = {"float": (True, False, ""), "int": (False, False, ""), "wleft": (True, True, ""),
           "pairs": (True, True, "exact"), "pairs_scaled": (True, True, "scaled")}
N_EXPERTS = 8


def parse_tile(spec: str) -> tuple:
    """``64x128w4s3`` -> (block_m, block_n, warps, stages); a ``k2`` suffix adds split-K 2."""
    found = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)(?:k(\d+))?", spec.strip())
    if not found:
        sys.exit(f"error: tile {spec!r} is not BMxBNwWARPSsSTAGES[kSPLIT], e.g. 64x128w4s3 or 16x64w4s3k2")
    return tuple(int(v) for v in found.groups() if v is not None)


def tile_config(tile: tuple) -> MatmulConfig:
    """A sweep tile ``(block_m, block_n, warps, stages[, split_k])`` as the kernels' config (K tiles of 128)."""
    bm, bn, warps, stages, split = tile + (1,) * (5 - len(tile))
    return MatmulConfig(bm, bn, 128, split, warps, stages)


def tile_name(tile: tuple) -> str:
    bm, bn, warps, stages, *split = tile
    return f"{bm}x{bn} w{warps} s{stages}" + (f" k{split[0]}" if split and split[0] > 1 else "")


def _weights(k, n, experts, copies, device):
    """``copies`` int4 g128 weights (words form, planes form) and their bf16 dense twins."""
    fmt = Int4Format(128)
    out = []
    for i in range(copies):
        gen = torch.Generator().manual_seed(i)
        w = torch.randn(*((experts,) if experts else ()), n, k, generator=gen) / math.sqrt(k)
        words = fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)
        out.append((words, words.to_planes(), words.dequantized(torch.bfloat16 if device.type == "cuda"
                                                                 else torch.float32)))
    return out


def _check(name, got, ref, failures, log):
    err = ((got.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if not math.isfinite(err) or err > 2e-2:
        failures.append(f"{name}: relative error {err:.3g}")
        log(f"FAIL {name}: relative error {err:.3g}")
    return err


SMALL_M_SWEEP = [(bn, split, warps) for bn in (32, 64, 128) for split in (1, 2, 4, 8) for warps in (2, 4)]


def sweep_record(record, log, label, m, variant, fns, ref, bytes_):
    """``record`` one sweep point; a tile that does not compile (or does not fit the GPU) is reported, not fatal.
    A wrong output is still a failure (``record`` checks it)."""
    try:
        record(label, m, variant, fns, ref, bytes_)
    except Exception as exc:  # noqa: BLE001
        log(f"sweep {label} M={m} {variant}: {type(exc).__name__}: {str(exc)[:100]}")


def small_m_sweep(label, m, record, ref, bytes_, calls, log):
    """Time the small-M kernel (16-row tensor-core tiles) at every (block_n, split_k, warps) of SMALL_M_SWEEP;
    ``calls(cfg)``: the copies' calls under that config."""
    for bn, split, warps in SMALL_M_SWEEP:
        sweep_record(record, log, label, m, f"small 16x{bn} k/{split} w{warps}",
                     calls(MatmulConfig(16, bn, 128, split, warps, 3)), ref, bytes_)


def grouped_tile_sweep(label, m, x, ws, row_expert, n_experts, tiles, unpacks, record, ref, bytes_, log):
    """Time the grouped GEMM kernel on plane words (``ws``' copies) at every tile of ``tiles`` and code unpacking of
    ``unpacks`` (:data:`UNPACKS`), its rows routed by ``row_expert`` over ``n_experts`` (a device-side tile map)."""
    for tile, how in itertools.product(tiles, unpacks):
        cfg = tile_config(tile)
        fl, left, pairs = UNPACKS[how]
        # (a config given: the expert-by-expert dequantization route is never taken)
        pol = MatmulPolicy(dequant_experts_min_m=1 << 40, plane_float_codes=fl, plane_weight_left=left,
                           plane_code_pairs=pairs, plane_gemm_code_pairs=pairs)
        st = expert_tile_map(row_expert, n_experts, cfg.block_m)
        sweep_record(record, log, label, m, f"planes {tile_name(tile)} {how}",
                     [lambda w=w, c=cfg, p=pol, t=st: dequant_matmul(x, w[1], row_expert=row_expert, tiles=t,
                                                                    config=c, policy=p) for w in ws],
                     ref, bytes_)


def run(m_values, sweep, quick, log, parts=("dense", "experts"), expert_sweep=None, unpacks=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timed = device.type == "cuda"
    dtype = torch.bfloat16 if timed else torch.float32
    dense = ([("tiny", 300, 40)] if quick else DENSE) if "dense" in parts else []
    experts = ([("tiny x3", 256, 48)] if quick else EXPERTS) if "experts" in parts else []
    n_experts = 3 if quick else N_EXPERTS
    rows, failures = [], []

    def record(shape, m, variant, fns, ref_fn_out, bytes_):
        got = fns[0]()
        err = _check(f"{shape} M={m} {variant}", got, ref_fn_out, failures, log)
        us = time_calls(fns) if timed else float("nan")
        rows.append(dict(shape=shape, m=m, variant=variant, us=us, rel_err=err, bytes=bytes_))
        log(f"{shape:10s} M={m:5d} {variant:22s} {us:9.2f} us  err {err:.1e}")
        return us

    for label, k, n in dense:
        ws = _weights(k, n, 0, copies_for(n * k // 2) if timed else 1, device)
        for m in m_values:
            x = torch.randn(m, k, device=device).to(dtype)
            ref = x.float() @ ws[0][0].dequantized()[0].t()
            if timed:
                record(label, m, "cublas_bf16", [lambda w=w: F.linear(x, w[2][0]) for w in ws], ref, 2 * n * k)
            record(label, m, "int4_words", [lambda w=w: dequant_matmul(x, w[0]) for w in ws], ref, n * k // 2)
            record(label, m, "int4_planes", [lambda w=w: dequant_matmul(x, w[1]) for w in ws], ref, n * k // 2)
            if m > 16:  # the tile kernels themselves where the default takes one dequantization pass + cuBLAS
                for form, idx in (("words", 0), ("planes", 1)):
                    cfg = gemm_config(m, ws[0][idx], device)
                    record(label, m, f"int4_{form}_gemm",
                           [lambda w=w, c=cfg, i=idx: dequant_matmul(x, w[i], config=c) for w in ws], ref, n * k // 2)
            if sweep and timed and 1 < m <= 16:  # the small-M kernel's tiles (batched decode)
                small_m_sweep(label, m, record, ref, n * k // 2,
                              lambda cfg, ws=ws: [lambda w=w: dequant_matmul(x, w[1], config=cfg) for w in ws], log)
            if sweep and timed and expert_sweep and m <= 16:  # the grouped GEMM kernel, this matrix as one
                one = torch.zeros(m, dtype=torch.int32, device=device)  # expert (batched decode's tiles)
                grouped_tile_sweep(label, m, x, ws, one, 1, expert_sweep, unpacks or list(UNPACKS), record, ref,
                                   n * k // 2, log)
            if sweep and timed and m >= 64:  # the tile kernel itself (a config given: no dequantization pass), at
                #                               the given tiles and unpackings (default: a grid, the default's)
                for tile, how in itertools.product(expert_sweep or DENSE_SWEEP, unpacks or ["wleft"]):
                    cfg, (fl, left, pairs) = tile_config(tile), UNPACKS[how]
                    pol = MatmulPolicy(plane_float_codes=fl, plane_weight_left=left, plane_code_pairs=pairs,
                                       plane_gemm_code_pairs=pairs)
                    sweep_record(record, log, label, m, f"planes {tile_name(tile)} {how}",
                                 [lambda w=w, c=cfg, p=pol: dequant_matmul(x, w[1], config=c, policy=p) for w in ws],
                                 ref, n * k // 2)
        del ws
        if timed:
            torch.cuda.empty_cache()

    for label, k, n in experts:
        ws = _weights(k, n, n_experts, copies_for(n_experts * n * k // 2) if timed else 1, device)
        for m in m_values:
            gen = torch.Generator().manual_seed(m)
            idx = torch.randint(0, n_experts, (m,), generator=gen).to(device=device, dtype=torch.int32)
            x = torch.randn(m, k, device=device).to(dtype)
            dense_f32 = ws[0][0].dequantized()
            ref = torch.empty(m, n, device=device)  # expert by expert (a gathered [M, N, K] stack is ~90 GB)
            for e in range(n_experts):
                sel = idx == e
                ref[sel] = x[sel].float() @ dense_f32[e].t()
            tiles = None
            if m > 16:
                tiles = expert_tile_map(idx, n_experts, gemm_config(m, ws[0][1], device).block_m)
            stack = [PackedWeight.from_float(w[2]) for w in ws]
            ft = expert_tile_map(idx, n_experts, gemm_config(m, stack[0], device).block_m) if m > 16 else None
            record(label, m, "bf16_experts", [lambda s=s: dequant_matmul(x, s, row_expert=idx, tiles=ft)
                                              for s in stack], ref, 2 * n_experts * n * k)
            wt = expert_tile_map(idx, n_experts, gemm_config(m, ws[0][0], device).block_m) if m > 16 else None
            record(label, m, "int4_words", [lambda w=w: dequant_matmul(x, w[0], row_expert=idx, tiles=wt)
                                            for w in ws], ref, n_experts * n * k // 2)
            record(label, m, "int4_planes", [lambda w=w: dequant_matmul(x, w[1], row_expert=idx, tiles=tiles)
                                             for w in ws], ref, n_experts * n * k // 2)
            if m > 16:  # the prefill routes side by side: int4 tile kernel, expert-by-expert dense, whole stack
                for route, pol in (("tiles", MatmulPolicy(dequant_experts_min_m=1 << 40)),
                                   ("via_dense", MatmulPolicy(dequant_experts_min_m=0)),
                                   ("via_stack", MatmulPolicy(dequant_experts_min_m=0,
                                                              dequant_experts_whole_stack=True))):
                    record(label, m, f"int4_planes_{route}",
                           [lambda w=w, p=pol: dequant_matmul(x, w[1], row_expert=idx, tiles=tiles, policy=p)
                            for w in ws], ref, n_experts * n * k // 2)
            if sweep and timed and 1 < m <= 16:  # the small-M kernel's tiles, one program column per expert
                small_m_sweep(label, m, record, ref, n_experts * n * k // 2,
                              lambda cfg, ws=ws: [lambda w=w: dequant_matmul(x, w[1], row_expert=idx, config=cfg)
                                           for w in ws], log)
            if sweep and timed and (m >= 64 or (expert_sweep and m <= 16)):  # grouped GEMM tiles of the plane
                #                                   kernel by code unpacking / product
                grouped_tile_sweep(label, m, x, ws, idx, n_experts, expert_sweep or EXPERT_SWEEP,
                                   unpacks or list(UNPACKS), record, ref, n_experts * n * k // 2, log)
        del ws
        if timed:
            torch.cuda.empty_cache()
    return rows, failures


def table(rows) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows if " " not in r["variant"]))
    lines = ["| shape | M | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    keys = list(dict.fromkeys((r["shape"], r["m"]) for r in rows))
    by = {(r["shape"], r["m"], r["variant"]): r["us"] for r in rows}
    for shape, m in keys:
        cells = [f"{by[(shape, m, v)]:.2f}" if (shape, m, v) in by else "-" for v in variants]
        lines.append(f"| {shape} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", default="2,4,8,16,64,256,2048")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--parts", default="dense,experts", help="dense projections, expert stacks, or both")
    ap.add_argument("--expert-tiles", help="the expert sweep's tiles, e.g. 64x128w4s3,16x64w4s3k2 (k: split-K; "
                    "default: a grid at M >= 64); given, they are also timed at M <= 16 (batched decode) on the "
                    "grouped GEMM kernel, for the expert stacks and, as one expert, the dense projections, and "
                    "they replace the dense sweep's grid at M >= 64 (with --unpacks there too)")
    ap.add_argument("--unpacks", help="the expert sweep's unpacking: float (codes as floats), int (integer "
                    "conversions), wleft (float codes, the product as W x^T), pairs / pairs_scaled (W x^T, the "
                    "codes two at a time: MatmulPolicy.plane_(gemm_)code_pairs exact / scaled); default all five")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    require_idle_gpu()
    m_values = [int(v) for v in args.m.split(",")] if not args.quick else [3, 19]
    tiles = [parse_tile(t) for t in args.expert_tiles.split(",")] if args.expert_tiles else None
    unpacks = args.unpacks.split(",") if args.unpacks else None
    if unpacks and not set(unpacks) <= set(UNPACKS):
        sys.exit(f"error: --unpacks takes {', '.join(UNPACKS)}")
    rows, failures = run(m_values, args.sweep, args.quick, lambda s: print(s, flush=True),
                         tuple(args.parts.split(",")), tiles, unpacks)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    Path(args.out).write_text(json.dumps(dict(device=device, torch=torch.__version__, rows=rows,
                                              failures=failures), indent=1))
    print(table(rows))
    if failures:
        print(f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
