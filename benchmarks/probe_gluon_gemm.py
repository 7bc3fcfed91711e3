"""Probe (not product code): the int4 plane-word prefill GEMM as ``W x^T`` written in Gluon, Triton's explicit-layout
dialect, so that the tensor cores' products run asynchronously while the next nibble position is unpacked.

Why: the Triton kernel (:mod:`qmamba.kernels.dequant_gemm`, ``W x^T`` on plane words) waits for its tensor cores
after every nibble position (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each pair of ``HGMMA.64x64x16``, 8 a K tile:
benchmarks/results.md, session 22), so unpacking and products never overlap within a warpgroup, and no tile size
fixed it (session 23). Here each position's dequantized tile goes to ``warpgroup_mma(..., is_async=True)`` from
registers and the kernel waits only until one product is in flight (``warpgroup_mma_wait(1)``), keeping the
previous position's registers alive through the wait's ``deps``; the input tile is stored per K tile into a
double-buffered shared-memory tile the products read.

One dense matrix, or the grouped GEMM of a routed expert stack over the prefill's tile map
(:func:`qmamba.kernels.routing.expert_tile_map`; the tile's rows gathered into the shared-memory input tile, the
routing weight in the epilogue). Weights as :func:`qmamba.quant.layout.int4_to_planes` stores them:
nibble ``i`` of word ``w`` of a 128-element K tile holds ``k = k0 + 16 i + w``, one group per tile or more
(``GROUP`` a multiple of 128). Each code becomes ``(code - zero) * scale`` rounded to bf16 (what the dequantization
pass + cuBLAS path computes), so the products accumulate over all K tiles with no per-tile rescale.

    python benchmarks/probe_gluon_gemm.py --compile-only        # no GPU: sm_90 registers, HGMMA / wait counts
    python benchmarks/probe_gluon_gemm.py [--m 8,256,2048]      # GPU: checked against x @ W_hat^T, then timed
        # beside the Triton tile kernel and cuBLAS bf16 (one matrix) or our bf16 grouped GEMM (8 routed experts)

Exits non-zero when a result differs from the reference or the kernel does not build.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

from qmamba.quant.formats import Int4Format  # noqa: E402

SHAPES = {"fc1": (7744, 1472), "in_proj": (5888, 1472), "fc2": (1472, 3872)}  # (N, K), one matrix
# a CTA-wide barrier: gl.thread_barrier in Triton 3.6 (the H200 image), gl.barrier from 3.7 on
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, n, n_ok, t, swn, ssn, szn, GROUP: gl.constexpr, wcol):
    """K tile ``t`` of the plane words of rows ``n``: ``(words [BN, 16] int32, 2^23 + zero [BN], scale [BN])``."""
    k0 = t * 128
    words = gl.load(w_ptr + n[:, None] * swn + (k0 // 8 + wcol)[None, :], mask=n_ok[:, None], other=0)
    blk = k0 // GROUP
    zb = gl.load(z_ptr + n * szn + blk // 2, mask=n_ok, other=0).to(gl.int32)
    zero = ((zb >> ((blk % 2) * 4)) & 0xF).to(gl.float32) + 8388608.0
    scale = gl.load(s_ptr + n * ssn + blk, mask=n_ok, other=0.0).to(gl.float32)
    return words, zero, scale


@gluon.jit
def _planes_wgmma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, rscale_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                         sorted_ptr, M, N, K, K_PAD, sxm, swe, swn, sse, ssn, sze, szn, som,
                         GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, IN_FLIGHT: gl.constexpr,
                         TILES: gl.constexpr, HAS_RSCALE: gl.constexpr, num_warps: gl.constexpr):
    pid_n = gl.program_id(0)  # weight-row tiles fastest: neighbouring programs share the input tile in L2
    pid_m = gl.program_id(1)  # a row tile of the input, or (TILES) a tile of the expert tile map
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    x_blocked: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    x_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 128], gl.bfloat16)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, 128], x_shared)  # two K tiles of the input

    r_x = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_blocked))
    r_e = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    tiles = K_PAD // 128
    if TILES:  # the tile's rows: sorted_ids[lo:hi] of one expert; a spare tile (lo == hi) runs no K loop
        expert = gl.load(tile_e_ptr + pid_m).to(gl.int64)
        lo = gl.load(tile_lo_ptr + pid_m)
        hi = gl.load(tile_hi_ptr + pid_m)
        tok_in = lo + r_x < hi
        tok = gl.load(sorted_ptr + lo + r_x, mask=tok_in, other=0)
        out_in = lo + r_e < hi
        t_e = gl.load(sorted_ptr + lo + r_e, mask=out_in, other=0)
        tiles = gl.where(hi > lo, tiles, 0)
    else:
        expert = (pid_m * 0).to(gl.int64)
        tok = pid_m * BLOCK_M + r_x
        tok_in = tok < M
        t_e = pid_m * BLOCK_M + r_e
        out_in = t_e < M
    w_ptr += expert * swe
    s_ptr += expert * sse
    z_ptr += expert * sze
    n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
    n_ok = n < N
    wcol = gl.arange(0, 16, layout=gl.SliceLayout(0, a_layout))
    kx = gl.arange(0, 128, layout=gl.SliceLayout(0, x_blocked))
    x_rows = x_ptr + tok[:, None] * sxm
    tok_ok = tok_in[:, None]
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    a_prev = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_layout)
    # K tile 0 into registers; each trip stores its tile for the products and loads the next one meanwhile
    words, zero, scale = _weight_tile(w_ptr, s_ptr, z_ptr, n, n_ok, 0, swn, ssn, szn, GROUP, wcol)
    xt = gl.load(x_rows + kx[None, :], mask=tok_ok & (kx < K)[None, :], other=0.0)
    for t in range(0, tiles):
        buf = x_smem.index(t % 2)  # the product still in flight reads the other buffer
        buf.store(xt.to(gl.bfloat16))
        fence_async_shared()
        _barrier()
        k1 = (t + 1) * 128
        words_1, zero_1, scale_1 = _weight_tile(w_ptr, s_ptr, z_ptr, n, n_ok & (t + 1 < tiles), t + 1, swn, ssn,
                                                szn, GROUP, wcol)
        xt = gl.load(x_rows + (k1 + kx)[None, :], mask=tok_ok & (k1 + kx < K)[None, :], other=0.0)
        for i in gl.static_range(8):
            nib = (words >> (4 * i)) & 0xF
            codes = (nib | 0x4B000000).to(gl.float32, bitcast=True) - zero[:, None]  # exact: code - zero
            a = (codes * scale[:, None]).to(gl.bfloat16)
            acc = warpgroup_mma(a, buf.slice(16 * i, 16, dim=1).permute((1, 0)), acc, is_async=True)
            # at most IN_FLIGHT products outstanding; the previous position's tile stays alive until its product
            # is done (passed through the wait)
            acc, a_prev = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc, a_prev))
            a_prev = a
            if i == 0 and num_warps > 4:
                # two warpgroups: both have now seen the previous K tile's last product finish (the wait above),
                # so neither overwrites that tile's buffer (next trip's store) while the other's product reads it
                _barrier()
        words, zero, scale = words_1, zero_1, scale_1
    # the last product's registers stay reserved until it is done
    acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))
    if HAS_RSCALE:
        acc = acc * gl.load(rscale_ptr + t_e, mask=out_in, other=0.0).to(gl.float32)[None, :]
    n_e = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    gl.store(out_ptr + t_e[None, :] * som + n_e[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(n_e < N)[:, None] & out_in[None, :])


def planes_weight(n: int, k: int, device, seed: int = 0, experts: int | None = None):
    """A random int4 g128 matrix (or a stack of ``experts``) as plane words (a
    :class:`qmamba.kernels.weights.PackedWeight`)."""
    g = torch.Generator().manual_seed(seed)
    fmt = Int4Format(128)
    w = torch.randn(*((experts,) if experts else ()), n, k, generator=g) / k ** 0.5
    words = fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)
    return words.to_planes()


def _args(x, weight, out, block_n, block_m, in_flight, num_warps, tiles=None, row_scale=None):
    q, s, z = weight.qweight, weight.scales, weight.zeros
    m = x.shape[0]
    tile_args = tiles.tensors() if tiles is not None else (x, x, x, x)
    args = (x, q, s, z, out, row_scale if row_scale is not None else x, *tile_args, m, weight.n, weight.k,
            weight.k_padded, x.stride(0), q.stride(0), q.stride(1), s.stride(0), s.stride(1), z.stride(0),
            z.stride(1), out.stride(0))
    meta = dict(GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_M=block_m, IN_FLIGHT=in_flight,
                TILES=tiles is not None, HAS_RSCALE=row_scale is not None, num_warps=num_warps)
    grid = (-(-weight.n // block_n), tiles.n_tiles if tiles is not None else -(-m // block_m))
    return grid, args, meta


def planes_wgmma_matmul(x, weight, block_n=128, block_m=64, in_flight=1, num_warps=4, row_expert=None,
                        row_scale=None):
    """``x [M, K] bf16 @ W_hat^T`` -> ``[M, N]`` bf16 on the Gluon kernel (CUDA, Hopper); a stack's rows routed by
    ``row_expert [M]`` (the grouped GEMM over :func:`qmamba.kernels.routing.expert_tile_map`), times ``row_scale``."""
    from qmamba.kernels.routing import expert_tile_map

    out = torch.empty(x.shape[0], weight.n, device=x.device, dtype=torch.bfloat16)
    if weight.n_experts != 1 and row_expert is None:
        raise ValueError("planes_wgmma_matmul: a stack needs row_expert")
    tiles = expert_tile_map(row_expert, weight.n_experts, block_m) if row_expert is not None else None
    grid, args, meta = _args(x, weight, out, block_n, block_m, in_flight, num_warps, tiles, row_scale)
    _planes_wgmma_kernel[grid](*args, **meta)
    return out


def compile_offline(block_n, block_m, in_flight, num_warps, arch=90, tiles=False):
    """The kernel compiled for ``sm_<arch>`` without a GPU (Triton's own ptxas) as a launch at BlackMamba-2.8B's fc1
    (one matrix, or with ``tiles`` the 8-expert stack routed at random, with the routing weight) would specialise
    it: the launch is recorded on CPU tensors, then compiled. ``(compiled, report)``."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from inspect_decode_kernel import _Recorder, compile_recorded, report

    global _planes_wgmma_kernel
    real = _planes_wgmma_kernel
    recorder = _Recorder(real)
    n, k = SHAPES["fc1"]
    weight = planes_weight(n, k, "cpu", experts=8 if tiles else None)
    m = 2048
    x = torch.randn(m, k).to(torch.bfloat16)
    idx = torch.randint(0, 8, (m,), dtype=torch.int32) if tiles else None
    _planes_wgmma_kernel = recorder
    try:
        planes_wgmma_matmul(x, weight, block_n, block_m, in_flight, num_warps, row_expert=idx,
                            row_scale=torch.rand(m) if tiles else None)
    finally:
        _planes_wgmma_kernel = real
    _, args, meta = recorder.calls[-1]
    compiled = compile_recorded(real, args, meta, arch, source_cls=GluonASTSource)
    return compiled, report(compiled)


def _time_row(label, fns, ref, failures):
    """Check each callable's output against ``ref`` (relative error below 1e-2), then time it; one printed row."""
    from timing import time_calls  # noqa: E402

    row = [label]
    for name, fn in fns.items():
        out = fn()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            failures.append(f"{label} {name}: rel err {err:.2e}")
            row.append(f"{name} FAILED ({err:.1e})")
            continue
        row.append(f"{name} {time_calls([fn], calls_per_graph=None):8.2f} us")
    print("  ".join(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--m", default="8,256,2048", help="rows (tokens); 8: batched decode's routed experts")
    ap.add_argument("--shapes", default="fc1,in_proj,fc2,fc1x8,fc2x8",
                    help="one matrix, or (x8) the stack of 8 experts with random top-1 routing, fc2 times the "
                         "routing weight")
    ap.add_argument("--configs", default="128x64f1,128x64f0,64x64f1,128x64f1w8,128x128f1w8,64x16f1,128x16f1w8",
                    help="BLOCK_N x BLOCK_M, f: products left in flight at each wait (0: the drain of the Triton "
                         "kernel, for comparison), w: warps (default 4; 8: two warpgroups split the weight rows)")
    args = ap.parse_args()
    configs = []
    for c in args.configs.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)f(\d)(?:w(\d+))?", c)
        if match is None:
            sys.exit(f"error: bad config {c!r} (e.g. 128x64f1 or 128x128f1w8)")
        bn, bm, f, w = match.groups()
        configs.append((int(bn), int(bm), int(f), int(w or 4)))
    if args.compile_only:
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        for tiles in (False, True):
            for bn, bm, f, w in configs:
                compiled, r = compile_offline(bn, bm, f, w, tiles=tiles)
                waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", r["sass"])
                print(f"{'experts ' if tiles else 'dense   '}{bn}x{bm} w{w} in flight {f}: regs {r['regs']} "
                      f"stack {r['stack']} shared {compiled.metadata.shared} HGMMA {r['ops']['HGMMA']} waits "
                      f"{len(waits)} ({', '.join(sorted(set(waits)))}) SASS {sum(r['ops'].values())}", flush=True)
        return
    from timing import require_idle_gpu  # noqa: E402

    import torch.nn.functional as F

    from qmamba.kernels.dequant_gemm import dequant_gemm
    from qmamba.kernels.matmul_configs import gemm_config
    from qmamba.kernels.quant_matmul import dequant_matmul, dequant_matmul_ref
    from qmamba.kernels.weights import PackedWeight

    require_idle_gpu()
    dev = torch.device("cuda")
    failures = []
    for shape in args.shapes.split(","):
        experts = 8 if shape.endswith("x8") else None
        n, k = SHAPES[shape.removesuffix("x8")]
        w = planes_weight(n, k, dev, experts=experts)
        dense = w.dequantized(torch.float32)
        wb = dense.to(torch.bfloat16)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            if experts:  # the grouped GEMM: ours on plane words (the prefill's), ours on the bf16 stack, Gluon
                idx = torch.randint(0, experts, (m,), device=dev, dtype=torch.int32)
                rw = torch.rand(m, device=dev) + 0.5 if shape == "fc2x8" else None
                ref = dequant_matmul_ref(x, w, row_expert=idx, row_scale=rw).float()
                stack = PackedWeight.from_float(wb)
                fns = {"bf16_experts": lambda: dequant_matmul(x, stack, row_expert=idx, row_scale=rw),
                       "triton_tiles": lambda: dequant_matmul(x, w, row_expert=idx, row_scale=rw)}
                for bn, bm, f, nw in configs:
                    fns[f"gluon_{bn}x{bm}f{f}w{nw}"] = (lambda bn=bn, bm=bm, f=f, nw=nw: planes_wgmma_matmul(
                        x, w, bn, bm, f, nw, row_expert=idx, row_scale=rw))
            else:
                ref = x.float() @ dense[0].t()
                cfg = gemm_config(m, w, dev)
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                fns = {"cublas_bf16": lambda: F.linear(x, wb[0]),
                       "triton_tiles": lambda: dequant_gemm(x, w, out, None, None, None, cfg, False,
                                                            plane_float_codes=True, plane_weight_left=True) or out}
                for bn, bm, f, nw in configs:
                    fns[f"gluon_{bn}x{bm}f{f}w{nw}"] = (lambda bn=bn, bm=bm, f=f, nw=nw: planes_wgmma_matmul(
                        x, w, bn, bm, f, nw))
            _time_row(f"{shape:8s} M={m:5d}", fns, ref, failures)
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
