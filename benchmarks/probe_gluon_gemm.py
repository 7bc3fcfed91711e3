"""Probe (not product code): the int4 plane-word prefill GEMM as ``W x^T`` written in Gluon, Triton's explicit-layout
dialect, so that the tensor cores' products run asynchronously while the next nibble position is unpacked.

Why: the Triton kernel (:mod:`qmamba.kernels.dequant_gemm`, ``W x^T`` on plane words) waits for its tensor cores
after every nibble position (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each pair of ``HGMMA.64x64x16``, 8 a K tile:
benchmarks/results.md, session 22), so unpacking and products never overlap within a warpgroup, and no tile size
fixed it (session 23). Here each position's dequantized tile goes to ``warpgroup_mma(..., is_async=True)`` from
registers and the kernel waits only until one product is in flight (``warpgroup_mma_wait(1)``), keeping the
previous position's registers alive through the wait's ``deps``; the input tile is stored per K tile into a
double-buffered shared-memory tile the products read.

One dense matrix (no expert tile map yet), weights as :func:`qmamba.quant.layout.int4_to_planes` stores them:
nibble ``i`` of word ``w`` of a 128-element K tile holds ``k = k0 + 16 i + w``, one group per tile or more
(``GROUP`` a multiple of 128). Each code becomes ``(code - zero) * scale`` rounded to bf16 (what the dequantization
pass + cuBLAS path computes), so the products accumulate over all K tiles with no per-tile rescale.

    python benchmarks/probe_gluon_gemm.py --compile-only        # no GPU: sm_90 registers, HGMMA / wait counts
    python benchmarks/probe_gluon_gemm.py [--m 256,2048]        # GPU: checked against x @ W_hat^T, then timed
                                                                 # beside the Triton tile kernel and cuBLAS bf16

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
def _planes_wgmma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, K_PAD, sxm, swn, ssn, szn, som,
                         GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, IN_FLIGHT: gl.constexpr,
                         num_warps: gl.constexpr):
    pid_n = gl.program_id(0)  # weight-row tiles fastest: neighbouring programs share the input tile in L2
    pid_m = gl.program_id(1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    x_blocked: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
    x_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 128], gl.bfloat16)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, 128], x_shared)  # two K tiles of the input

    n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
    n_ok = n < N
    wcol = gl.arange(0, 16, layout=gl.SliceLayout(0, a_layout))
    tok = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_blocked))
    kx = gl.arange(0, 128, layout=gl.SliceLayout(0, x_blocked))
    x_rows = x_ptr + tok[:, None] * sxm
    tok_ok = (tok < M)[:, None]
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    a_prev = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_layout)
    tiles = K_PAD // 128
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
        words, zero, scale = words_1, zero_1, scale_1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    n_e = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    t_e = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + t_e[None, :] * som + n_e[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(n_e < N)[:, None] & (t_e < M)[None, :])


def planes_weight(n: int, k: int, device, seed: int = 0):
    """One random int4 g128 matrix as plane words (a :class:`qmamba.kernels.weights.PackedWeight`)."""
    g = torch.Generator().manual_seed(seed)
    fmt = Int4Format(128)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    words = fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)
    return words.to_planes()


def _args(x, weight, out, block_n, block_m, in_flight, num_warps):
    q, s, z = weight.qweight[0], weight.scales[0], weight.zeros[0]
    m = x.shape[0]
    args = (x, q, s, z, out, m, weight.n, weight.k, weight.k_padded, x.stride(0), q.stride(0), s.stride(0),
            z.stride(0), out.stride(0))
    meta = dict(GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_M=block_m, IN_FLIGHT=in_flight, num_warps=num_warps)
    grid = (-(-weight.n // block_n), -(-m // block_m))
    return grid, args, meta


def planes_wgmma_matmul(x, weight, block_n=128, block_m=64, in_flight=1, num_warps=4):
    """``x [M, K] bf16 @ W_hat^T`` -> ``[M, N]`` bf16 on the Gluon kernel (CUDA, Hopper)."""
    out = torch.empty(x.shape[0], weight.n, device=x.device, dtype=torch.bfloat16)
    grid, args, meta = _args(x, weight, out, block_n, block_m, in_flight, num_warps)
    _planes_wgmma_kernel[grid](*args, **meta)
    return out


def compile_offline(block_n, block_m, in_flight, num_warps, arch=90):
    """The kernel compiled for ``sm_<arch>`` without a GPU (Triton's own ptxas): ``(compiled, report)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from inspect_decode_kernel import report

    sig = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", out_ptr="*bf16", M="i32", N="i32", K="i32",
               K_PAD="i32", sxm="i32", swn="i32", ssn="i32", szn="i32", som="i32", GROUP="constexpr",
               BLOCK_N="constexpr", BLOCK_M="constexpr", IN_FLIGHT="constexpr", num_warps="constexpr")
    consts = dict(GROUP=128, BLOCK_N=block_n, BLOCK_M=block_m, IN_FLIGHT=in_flight, num_warps=num_warps)
    names = list(_planes_wgmma_kernel.arg_names)
    # pointers, and the integers a launch at BlackMamba-2.8B's fc1 would see divisible by 16 (K 1472, strides)
    attrs = {(names.index(p),): [["tt.divisibility", 16]]
             for p in ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "K", "K_PAD", "sxm", "swn", "ssn", "szn", "som")}
    src = GluonASTSource(_planes_wgmma_kernel, sig, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    return compiled, report(compiled)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--m", default="256,2048")
    ap.add_argument("--shapes", default="fc1,in_proj,fc2")
    ap.add_argument("--configs", default="128x64f1,128x64f0,64x64f1,128x64f1w8,128x128f1w8",
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
        for bn, bm, f, w in configs:
            compiled, r = compile_offline(bn, bm, f, w)
            waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", r["sass"])
            print(f"{bn}x{bm} w{w} in flight {f}: regs {r['regs']} stack {r['stack']} shared "
                  f"{compiled.metadata.shared} HGMMA {r['ops']['HGMMA']} waits {len(waits)} "
                  f"({', '.join(sorted(set(waits)))}) SASS {sum(r['ops'].values())}", flush=True)
        return
    from timing import require_idle_gpu, time_calls  # noqa: E402

    import torch.nn.functional as F

    from qmamba.kernels.dequant_gemm import dequant_gemm
    from qmamba.kernels.matmul_configs import gemm_config

    require_idle_gpu()
    dev = torch.device("cuda")
    failures = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        w = planes_weight(n, k, dev)
        dense = w.dequantized(torch.float32)[0]
        wb = dense.to(torch.bfloat16)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = x.float() @ dense.t()
            row = [f"{shape:8s} M={m:5d}"]
            cfg = gemm_config(m, w, dev)
            triton_out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            fns = {"cublas_bf16": lambda: F.linear(x, wb),
                   "triton_tiles": lambda: dequant_gemm(x, w, triton_out, None, None, None, cfg, False,
                                                        plane_float_codes=True, plane_weight_left=True)}
            for bn, bm, f, nw in configs:
                fns[f"gluon_{bn}x{bm}f{f}w{nw}"] = lambda bn=bn, bm=bm, f=f, nw=nw: planes_wgmma_matmul(x, w, bn, bm,
                                                                                                    f, nw)
            for name, fn in fns.items():
                out = fn() if name != "triton_tiles" else (fn(), triton_out)[1]
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    failures.append(f"{shape} M={m} {name}: rel err {err:.2e}")
                    row.append(f"{name} FAILED ({err:.1e})")
                    continue
                us = time_calls([fn], calls_per_graph=None)
                row.append(f"{name} {us:8.2f} us")
            print("  ".join(row), flush=True)
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
