"""Dequantizing matmul ``y = x @ W_hat^T`` over the packed layouts of :mod:`qmamba.quant.layout`, in Triton.

One kernel serves every case; its compile-time switches pick

* the weight format: ``FMT_FLOAT`` (a plain ``[E, N, K]`` float tensor), ``FMT_INT8`` (per-row scale, applied in the
  epilogue) or ``FMT_INT4`` (MatMulNBits layout; the K tile is one quantization group, so the integer codes minus
  the zero point go through the dot exactly and the group's fp16 scale multiplies the partial product);
* the inner product: a broadcast-multiply-reduce for a single row (GEMV, M = 1) or ``tl.dot`` on tensor cores
  (16-row tiles for 2 <= M <= 16, larger tiles for prefill GEMMs), chosen by M in :func:`pick_config`;
* how rows find their weights: ``ROUTE_DENSE`` (one matrix), ``ROUTE_BY_EXPERT`` (decode MoE: one program column per
  expert reads only the rows routed to it; experts with no rows run an empty loop, no host sync, graph-capturable),
  ``ROUTE_TILES`` (prefill MoE: tokens sorted by expert into tiles of BLOCK_M rows, see
  :func:`expert_tile_map`, a grouped GEMM);
* split-K (``SPLIT_K > 1``: fp32 atomics into a zeroed buffer) for matrices too narrow to fill the GPU.

Shapes: ``x [M, K]`` (any float dtype; fp32 is for CPU interpreter tests), weights ``[E, N, ...]`` (E = 1 for a
plain linear). The pure-PyTorch twin is :func:`dequant_matmul_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.kernels._triton import jit, tl
from qmamba.quant import layout

FMT_FLOAT, FMT_INT8, FMT_INT4 = 0, 1, 2
FMT_INT4_PLANES = 3  # int4 codes in the decode kernels' plane words (layout.int4_to_planes); same scales / zeros
ROUTE_DENSE, ROUTE_BY_EXPERT, ROUTE_TILES = 0, 1, 2
GEMV_MAX_M = 16


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ---- the weight description ------------------------------------------------------------------------------------
@dataclass
class PackedWeight:
    """A (stacked) weight in one of the layouts, as the kernel reads it. ``n``/``k`` are the logical sizes."""

    fmt: int
    n: int
    k: int
    n_experts: int
    qweight: torch.Tensor             # float [E, N, K] | int8 [E, N, K] | uint8 [E, N, n_blocks, g/2] | planes int32 [E, N, W]
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0

    @property
    def k_padded(self) -> int:
        return _cdiv(self.k, self.group_size) * self.group_size if self.fmt in (FMT_INT4, FMT_INT4_PLANES) else self.k

    def to_planes(self) -> "PackedWeight":
        """The same int4 weight with its codes in plane words (a new tensor; scales and zero points shared)."""
        if self.fmt != FMT_INT4:
            raise ValueError("only int4 weights have a plane form")
        return PackedWeight(FMT_INT4_PLANES, self.n, self.k, self.n_experts, layout.int4_to_planes(self.qweight, self.k),
                            self.scales, self.zeros, self.group_size)

    @classmethod
    def from_packed(cls, fmt_name: str, packed: dict, n: int, k: int) -> "PackedWeight":
        """From a layout dict (``qweight``/``scales``/``zeros``) of one matrix ``[N, ...]`` or a stack ``[E, N, ...]``."""
        q = packed["qweight"]
        if fmt_name == "int8":
            lead = tuple(q.shape[:-2])
            layout.check_int8(q, packed["scales"], n, k, lead)
            q3, s2 = q.reshape(-1, n, k), packed["scales"].reshape(-1, n)
            return cls(FMT_INT8, n, k, q3.shape[0], q3, s2)
        if fmt_name == "int4":
            g = q.shape[-1] * 2
            lead = tuple(q.shape[:-3])
            layout.check_int4(q, packed["scales"], packed["zeros"], n, k, g, lead)
            nb = q.shape[-2]
            return cls(FMT_INT4, n, k, int(torch.tensor(lead).prod()) if lead else 1, q.reshape(-1, n, nb, g // 2),
                       packed["scales"].reshape(-1, n, nb), packed["zeros"].reshape(-1, n, packed["zeros"].shape[-1]),
                       g)
        raise ValueError(f"no Triton kernel for weight format {fmt_name!r}")

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "PackedWeight":
        """A float weight ``[N, K]`` or stack ``[E, N, K]``."""
        w3 = w if w.dim() == 3 else w[None]
        return cls(FMT_FLOAT, w3.shape[1], w3.shape[2], w3.shape[0], w3)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """``[E, N, K]`` dense (the reference's view)."""
        if self.fmt == FMT_FLOAT:
            return self.qweight.to(dtype)
        if self.fmt == FMT_INT8:
            return layout.dequantize_int8(self.qweight, self.scales, dtype)
        q = self.qweight
        if self.fmt == FMT_INT4_PLANES:
            q = layout.int4_from_planes(q, self.scales.shape[-1], self.group_size)
        return layout.dequantize_int4(q, self.scales, self.zeros, self.k, dtype)


# ---- reference twin ----------------------------------------------------------------------------------------------
def dequant_matmul_ref(x, weight: PackedWeight, bias=None, row_expert=None, row_scale=None):
    """``x [M, K]`` -> ``[M, N]``: row m uses expert ``row_expert[m]`` (0 when None), times ``row_scale[m]``."""
    w = weight.dequantized(torch.float32)
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if row_expert is None else row_expert.long()
    y = torch.einsum("mk,mnk->mn", x.float(), w[idx]) if x.shape[0] else x.new_zeros(0, weight.n).float()
    if bias is not None:
        y = y + bias.float()
    if row_scale is not None:
        y = y * row_scale.float()[:, None]
    return y.to(x.dtype)


# ---- kernel --------------------------------------------------------------------------------------------------------
@jit
def _dequant_matmul_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, rexp_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
    sorted_ptr, M, N, K, K_PAD, sxm, sxk, som, son, swe, swn, sse, ssn, sze, szn,
    FMT: tl.constexpr, ROUTE: tl.constexpr, GROUP: tl.constexpr, PRESCALE: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    # -- which rows, which expert
    if ROUTE == 0:
        rows = pid_m * BLOCK_M + rm
        row_ok = rows < M
        expert = pid_m * 0
    elif ROUTE == 1:
        rows = rm
        expert = pid_m
        ids = tl.load(rexp_ptr + rows, mask=rows < M, other=-1)
        row_ok = ids == expert
    else:
        expert = tl.load(tile_e_ptr + pid_m)
        lo = tl.load(tile_lo_ptr + pid_m)
        hi = tl.load(tile_hi_ptr + pid_m)
        row_ok = lo + rm < hi
        rows = tl.load(sorted_ptr + lo + rm, mask=row_ok, other=0)
    n_rows = tl.sum(row_ok.to(tl.int32), axis=0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    # -- this split's K range (whole tiles); no rows -> empty loop
    tiles = tl.cdiv(K_PAD, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    k_lo = pid_k * per_split * BLOCK_K
    k_hi = tl.minimum((pid_k + 1) * per_split * BLOCK_K, K_PAD)
    k_hi = tl.where(n_rows > 0, k_hi, k_lo)
    w_base = w_ptr + expert.to(tl.int64) * swe
    # the weight is the dot's left operand (it can stay in registers after dequantization): acc is [BLOCK_N,
    # BLOCK_M] on the tensor-core path, a [BLOCK_N] vector on the single-row path
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    e64 = expert.to(tl.int64)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FMT == 2:
            # int4: low nibbles hold even k, high nibbles odd k; no interleaving, two half-width products
            j = tl.arange(0, BLOCK_K // 2)
            ke = k0 + 2 * j
            kb_ok = (k0 // 2 + j) < K_PAD // 2
            packed = tl.load(w_base + n[:, None] * swn + (k0 // 2 + j)[None, :], mask=n_ok[:, None] & kb_ok[None, :],
                             other=0)
            if PRESCALE:  # several groups per tile (group 16): scale before the product
                blk = ke // GROUP
                zb = tl.load(z_ptr + e64 * sze + n[:, None] * szn + (blk // 2)[None, :],
                             mask=n_ok[:, None] & kb_ok[None, :], other=0).to(tl.int32)
                zero = (zb >> ((blk % 2) * 4)[None, :]) & 0xF
                sc = tl.load(s_ptr + e64 * sse + n[:, None] * ssn + blk[None, :], mask=n_ok[:, None] & kb_ok[None, :],
                             other=0.0).to(tl.float32)
                w_lo = ((packed & 0xF).to(tl.int32) - zero).to(tl.float32) * sc
                w_hi = ((packed >> 4).to(tl.int32) - zero).to(tl.float32) * sc
            else:  # one group per tile: integer codes minus zero point are exact; the group scale comes after
                blk = k0 // GROUP
                zb = tl.load(z_ptr + e64 * sze + n * szn + blk // 2, mask=n_ok, other=0).to(tl.int32)
                zero = ((zb >> ((blk % 2) * 4)) & 0xF)[:, None]
                scale = tl.load(s_ptr + e64 * sse + n * ssn + blk, mask=n_ok, other=0.0).to(tl.float32)
                w_lo = (packed & 0xF).to(tl.int32) - zero
                w_hi = (packed >> 4).to(tl.int32) - zero
            xm = row_ok[:, None] & (ke < K)[None, :]
            xe = tl.load(x_ptr + rows[:, None] * sxm + ke[None, :] * sxk, mask=xm, other=0.0)
            xo = tl.load(x_ptr + rows[:, None] * sxm + (ke + 1)[None, :] * sxk, mask=xm & (ke + 1 < K)[None, :],
                         other=0.0)
            if USE_DOT:
                if IEEE:
                    part = tl.dot(w_lo.to(tl.float32), tl.trans(xe.to(tl.float32)), input_precision="ieee")
                    part += tl.dot(w_hi.to(tl.float32), tl.trans(xo.to(tl.float32)), input_precision="ieee")
                else:
                    part = tl.dot(w_lo.to(x_ptr.dtype.element_ty), tl.trans(xe))
                    part += tl.dot(w_hi.to(x_ptr.dtype.element_ty), tl.trans(xo))
            else:  # a few rows: the weight tile is loaded once and reduced against each row in turn
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for r in tl.static_range(BLOCK_M):
                    xe_r = tl.sum(tl.where(rm[:, None] == r, xe.to(tl.float32), 0.0), axis=0)
                    xo_r = tl.sum(tl.where(rm[:, None] == r, xo.to(tl.float32), 0.0), axis=0)
                    pr = tl.sum(w_lo.to(tl.float32) * xe_r[None, :] + w_hi.to(tl.float32) * xo_r[None, :], axis=1)
                    part += tl.where(rm[None, :] == r, pr[:, None], 0.0)
            if PRESCALE:
                acc += part
            else:
                acc += part * scale[:, None]
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * sxm + k[None, :] * sxk, mask=row_ok[:, None] & (k < K)[None, :],
                        other=0.0)
            w = tl.load(w_base + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
            if USE_DOT:
                if IEEE:
                    acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x))
            else:
                for r in tl.static_range(BLOCK_M):
                    x_r = tl.sum(tl.where(rm[:, None] == r, x.to(tl.float32), 0.0), axis=0)
                    pr = tl.sum(w.to(tl.float32) * x_r[None, :], axis=1)
                    acc += tl.where(rm[None, :] == r, pr[:, None], 0.0)
    acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    # -- epilogue
    if FMT == 1:
        scale = tl.load(s_ptr + e64 * sse + n * ssn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    if HAS_RSCALE:
        acc = acc * tl.load(rscale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows[:, None] * som + n[None, :] * son
    mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _int4_gemv_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, rexp_ptr, N, K, K_PAD, sxk, son, swe, swn, sse, ssn,
    sze, szn, BY_EXPERT: tl.constexpr, GROUP: tl.constexpr, WORDS: tl.constexpr, GPI: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """int4 GEMV for one row (decode): the packed weight is read as 32-bit words (8 codes each) and each code becomes
    an fp32 without an int-to-float conversion: ``bits(code | 0x4B000000) = 2^23 + code``, so one subtraction of
    ``2^23 + zero point`` gives ``code - zero`` exactly. Each iteration reads ``GPI`` whole groups of ``BLOCK_N``
    rows (``WORDS = GROUP / 8`` words each); group scales multiply the per-group row sums. ``BY_EXPERT``: program
    column e computes only if the row is routed to expert e (decode MoE)."""
    pid_e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if BY_EXPERT:
        expert = pid_e
        active = tl.load(rexp_ptr) == expert
    else:
        expert = pid_e * 0
        active = pid_e == 0
    e64 = expert.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    j = tl.arange(0, WORDS)
    gi = tl.arange(0, GPI)
    n_groups = K_PAD // GROUP
    iters = tl.cdiv(n_groups, GPI)
    per_split = tl.cdiv(iters, SPLIT_K)
    it_lo = pid_k * per_split
    it_hi = tl.minimum(it_lo + per_split, iters)
    it_hi = tl.where(active, it_hi, it_lo)
    w_rows = w_ptr + e64 * swe + n[:, None, None] * swn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        grp = it * GPI + gi                                                                  # [GPI]
        g_ok = grp < n_groups
        wmask = n_ok[:, None, None] & g_ok[None, :, None]
        word = tl.load(w_rows + (grp * WORDS)[None, :, None] + j[None, None, :], mask=wmask, other=0)
        gmask = n_ok[:, None] & g_ok[None, :]
        zb = tl.load(z_ptr + e64 * sze + n[:, None] * szn + (grp // 2)[None, :], mask=gmask, other=0).to(tl.int32)
        zbias = ((zb >> ((grp % 2) * 4)[None, :]) & 0xF).to(tl.float32) + 8388608.0                  # [BN, GPI]
        scale = tl.load(s_ptr + e64 * sse + n[:, None] * ssn + grp[None, :], mask=gmask, other=0.0).to(tl.float32)
        kb = grp[:, None] * GROUP + 8 * j[None, :]                                           # [GPI, WORDS]
        part = tl.zeros((BLOCK_N, GPI, WORDS), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + (kb + i) * sxk, mask=(kb + i < K) & g_ok[:, None], other=0.0).to(tl.float32)
            code = ((word >> (4 * i)) & 0xF) | 0x4B000000
            part += (code.to(tl.float32, bitcast=True) - zbias[:, :, None]) * xi[None, :, :]
        acc += tl.sum(tl.sum(part, axis=2) * scale, axis=1)
    if HAS_BIAS:
        acc += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_RSCALE:
        acc = acc * tl.load(rscale_ptr).to(tl.float32)
    mask = n_ok & ((tl.zeros((BLOCK_N,), dtype=tl.int32) + active.to(tl.int32)) > 0)  # a vector mask (interpreter)
    if ATOMIC:
        tl.atomic_add(out_ptr + n * son, acc, mask=mask)
    else:
        tl.store(out_ptr + n * son, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _dequant_gemm_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, sorted_ptr,
    M, N, K, K_PAD, GRID_M, GRID_N, sxm, sxk, som, son, swe, swn, sse, ssn, sze, szn,
    FMT: tl.constexpr, TILES: tl.constexpr, GROUP: tl.constexpr, SCALE_AFTER: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr,
):
    """Prefill GEMM (M > 16): ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tensor-core tiles, the weight tile
    dequantized in registers. int4 nibbles are interleaved back to k order with ``join``; with one group per K tile
    (``SCALE_AFTER``) the exact integer codes minus the zero point go through the dot and the group scale multiplies
    the partial product, otherwise each weight is scaled before the dot. Programs are swizzled in groups of
    ``SWIZZLE`` row tiles so that neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    per_group = SWIZZLE * GRID_N
    first_m = (pid // per_group) * SWIZZLE
    group_rows = tl.minimum(GRID_M - first_m, SWIZZLE)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = tl.arange(0, BLOCK_M)
    if TILES:
        expert = tl.load(tile_e_ptr + pid_m)
        lo = tl.load(tile_lo_ptr + pid_m)
        hi = tl.load(tile_hi_ptr + pid_m)
        row_ok = lo + rm < hi
        rows = tl.load(sorted_ptr + lo + rm, mask=row_ok, other=0)
    else:
        rows = pid_m * BLOCK_M + rm
        row_ok = rows < M
        expert = pid_m * 0
    e64 = expert.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k_tiles = tl.cdiv(K_PAD, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * per_split * BLOCK_K
    k_hi = tl.minimum((pid_k + 1) * per_split * BLOCK_K, K_PAD)
    w_base = w_ptr + e64 * swe
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk, mask=row_ok[:, None] & (kk < K)[None, :],
                    other=0.0)
        if FMT == 2:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_base + n[:, None] * swn + j[None, :], mask=n_ok[:, None] & (j < K_PAD // 2)[None, :],
                             other=0)
            q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32)
            if SCALE_AFTER:
                blk = k0 // GROUP
                zb = tl.load(z_ptr + e64 * sze + n * szn + blk // 2, mask=n_ok, other=0).to(tl.int32)
                w = (q - ((zb >> ((blk % 2) * 4)) & 0xF)[:, None]).to(tl.float32)
                scale = tl.load(s_ptr + e64 * sse + n * ssn + blk, mask=n_ok, other=0.0).to(tl.float32)
            else:
                blk = kk // GROUP
                wm = n_ok[:, None] & (kk < K_PAD)[None, :]
                zb = tl.load(z_ptr + e64 * sze + n[:, None] * szn + (blk // 2)[None, :], mask=wm, other=0)
                zero = (zb.to(tl.int32) >> ((blk % 2) * 4)[None, :]) & 0xF
                sc = tl.load(s_ptr + e64 * sse + n[:, None] * ssn + blk[None, :], mask=wm, other=0.0)
                w = (q - zero).to(tl.float32) * sc.to(tl.float32)
        else:
            w = tl.load(w_base + n[:, None] * swn + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
        if IEEE:
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
        if FMT == 2 and SCALE_AFTER:
            acc += part * scale[None, :]
        else:
            acc += part
    if FMT == 1:
        acc = acc * tl.load(s_ptr + e64 * sse + n * ssn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RSCALE:
        acc = acc * tl.load(rscale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows[:, None] * som + n[None, :] * son
    mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, ROWS, K, K_PAD, swn, ssn, szn, son,
                       FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows of a packed int8/int4 matrix (experts flattened into rows) -> dense ``out [ROWS, K]``, products in fp32
    and one rounding to the output dtype (the reference's order). int4: the K tile is one group (``BLOCK_K ==
    GROUP``): contiguous packed bytes, nibbles interleaved back with ``join``, one scale and zero point per row."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    r_ok = r < ROWS
    mask = r_ok[:, None] & (k < K)[None, :]
    r64 = r.to(tl.int64)
    if FMT == 1:
        q = tl.load(w_ptr + r64[:, None] * swn + k[None, :], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + r64 * ssn, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    else:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + r64[:, None] * swn + j[None, :], mask=r_ok[:, None] & (j < K_PAD // 2)[None, :],
                         other=0)
        q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, BLOCK_K)).to(tl.int32)
        blk = k0 // GROUP
        zb = tl.load(z_ptr + r64 * szn + blk // 2, mask=r_ok, other=0).to(tl.int32)
        zero = (zb >> ((blk % 2) * 4)) & 0xF
        scale = tl.load(s_ptr + r64 * ssn + blk, mask=r_ok, other=0.0).to(tl.float32)
        w = (q - zero[:, None]).to(tl.float32) * scale[:, None]
    tl.store(out_ptr + r64[:, None] * son + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration ----------------------------------------------------------------------------------------
GEMV_ROWS = 1  # up to this many rows: CUDA-core reduction per row (weight tile reused); above: tensor cores
# (8 was measured on the H100: 5x slower than the 16-row tensor-core tile at batch 8)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def use_dot(self) -> bool:
        return self.block_m > GEMV_ROWS


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _small_block_m(m: int) -> int:
    """Rows per program for M <= 16: the next power of two up to GEMV_ROWS (reduction path), else 16 (dot)."""
    if m <= GEMV_ROWS:
        return 1 << max(0, m - 1).bit_length()
    return 16


def pick_config(m: int, weight: PackedWeight, device, route: int = ROUTE_DENSE) -> MatmulConfig:
    """Tile sizes by M: GEMV (M = 1), small-M tensor-core tiles (M <= 16), prefill GEMM tiles (M > 16)."""
    n, k_pad = weight.n, weight.k_padded
    g = weight.group_size
    if weight.fmt == FMT_INT4:  # one group per tile where the dot allows it (K >= 16 per half-tile)
        block_k = g if g >= 32 else (64 if m == 1 else 32)
    else:
        block_k = 128 if m <= GEMV_MAX_M else 64
    bm = _small_block_m(m)
    if device.type != "cuda":  # interpreter: each program costs Python time, so few large ones (split-K kept)
        bm = bm if m <= GEMV_MAX_M else 32
        return MatmulConfig(bm, 64, block_k, 2 if m <= GEMV_MAX_M and k_pad > 2 * block_k else 1, 1, 1)
    if m == 1 and weight.fmt == FMT_INT4 and INT4_WORD_GEMV:  # the word kernel, from the H100 GEMV sweep
        bn = 128 if n >= 16384 else (32 if n <= 2048 else 64)
        programs, groups = _cdiv(n, bn), _cdiv(k_pad, g)
        split = 1
        while programs * split < 4 * _sm_count(device) and split < 8 and split * 2 <= groups:
            split *= 2
        return MatmulConfig(1, bn, g, split, 2 if n >= 8192 else 4, 3)
    if m <= GEMV_MAX_M:
        bn = 128 if n >= 4096 and bm <= 2 else 64
        programs = _cdiv(n, bn)
        split = 1
        k_tiles = _cdiv(k_pad, block_k)
        while programs * split < 2 * _sm_count(device) and split < 8 and split * 2 <= max(1, k_tiles // 2):
            split *= 2
        if route == ROUTE_BY_EXPERT:  # most expert columns are idle: fill from the per-token experts only
            split = min(split, 4)
        return MatmulConfig(bm, bn, block_k, split, 4, 3)
    return gemm_config(m, weight, device)


def gemm_config(m: int, weight: PackedWeight, device) -> MatmulConfig:
    """Tiles of the prefill GEMM kernel (M > 16), from the H100 sweep (benchmarks/results_tables_h100.md, "Prefill
    GEMM sweep"): up to 64 rows the GEMM is bandwidth-bound (narrow tiles, split-K while the grid is small), above it
    64 x 128 and then 128 x 128 tiles."""
    g = weight.group_size
    block_k = (g if g >= 64 else 64) if weight.fmt == FMT_INT4 else 64
    if device.type != "cuda":
        return MatmulConfig(32, 64, block_k, 1, 1, 1)
    if m <= 64:
        bm, bn = (32 if m <= 32 else 64), 64
        block_k = block_k if weight.fmt == FMT_INT4 else 128
        programs = _cdiv(m, bm) * _cdiv(weight.n, bn)
        k_tiles = _cdiv(weight.k_padded, block_k)
        split = 1
        while programs * split < _sm_count(device) and split < 4 and split * 2 <= k_tiles // 16:  # long K only
            split *= 2
        return MatmulConfig(bm, bn, block_k, split, 4, 4)
    if m <= 256:
        return MatmulConfig(64, 128, block_k, 1, 4, 3 if weight.fmt == FMT_INT4 else 4)
    return MatmulConfig(128, 128, block_k, 1, 8, 3 if weight.fmt == FMT_INT4 else 4)


DEQUANT_GEMM_MIN_M = {FMT_INT4: 128, FMT_INT8: 512}  # on CUDA, dense weights, from this many rows: one Triton
# dequantization pass to x.dtype, then cuBLAS. Measured on the H100 (GEMM sweep): the pass costs about one read of
# the packed weight and one write of the dense one, which the tile kernel's repeated in-register dequantization
# overtakes from these M on; it costs a dense temporary of one matrix. Routed experts stay on the tile kernel.


def dequantize_stack(weight: PackedWeight, dtype) -> torch.Tensor:
    """``[E, N, K]`` in ``dtype`` (products in fp32, one rounding, as the reference); for large-M prefill GEMMs.
    One Triton pass on CUDA; the PyTorch expression below is its twin and the CPU path."""
    if weight.fmt == FMT_FLOAT:
        return weight.qweight.to(dtype)
    if weight.qweight.is_cuda:
        return dequantize_stack_triton(weight, dtype)
    if weight.fmt == FMT_INT8:
        return (weight.qweight.float() * weight.scales.float()[..., None]).to(dtype)
    q = weight.qweight
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)   # [E, N, nb, g]
    nb = q.shape[-2]
    z = torch.stack([weight.zeros & 0xF, weight.zeros >> 4], dim=-1).reshape(*weight.zeros.shape[:-1], -1)[..., :nb]
    w = (codes.float() - z.float()[..., None]) * weight.scales.float()[..., None]
    return w.reshape(*q.shape[:-2], -1)[..., :weight.k].to(dtype)


def dequantize_stack_triton(weight: PackedWeight, dtype, block_r: int = 64, block_k: int = 128) -> torch.Tensor:
    """Triton twin of :func:`dequantize_stack` (int8 / int4 only): ``[E, N, K]`` in ``dtype``. For int4 the K tile
    is one group (``block_k`` applies to int8)."""
    if weight.fmt not in (FMT_INT8, FMT_INT4):
        raise ValueError("dequantize_stack_triton: int8 or int4 weights only")
    rows = weight.n_experts * weight.n
    q = weight.qweight.reshape(rows, -1)  # the layouts are contiguous: experts flatten into rows
    s = weight.scales.reshape(rows, -1)
    z = weight.zeros.reshape(rows, -1) if weight.zeros is not None else q
    if weight.fmt == FMT_INT4:
        block_k = weight.group_size
    out = torch.empty(weight.n_experts, weight.n, weight.k, device=q.device, dtype=dtype)
    grid = (_cdiv(rows, block_r), _cdiv(weight.k_padded, block_k))
    _dequantize_kernel[grid](q, s, z, out, rows, weight.k, weight.k_padded, q.stride(0), s.stride(0), z.stride(0),
                             weight.k, FMT=weight.fmt, GROUP=max(weight.group_size, 1), BLOCK_R=block_r,
                             BLOCK_K=block_k, num_warps=4 if q.is_cuda else 1)
    return out


INT4_WORD_GEMV = True  # M = 1 int4: the 32-bit-word kernel (no int-to-float conversions); False: the generic path


def int32_words(q: torch.Tensor):
    """Packed bytes ``[E, N, ...]`` (int4 ``[E, N, nb, g/2]``, binary signs ``[E, N, KB]``) as int32 words
    ``[E, N, bytes / 4]`` (a view), or None (a row not a whole number of words, or unaligned)."""
    e, n = q.shape[0], q.shape[1]
    try:
        flat = q.reshape(e, n, -1)
        if flat.stride(-1) != 1 or flat.data_ptr() % 4 or flat.stride(1) % 4 or flat.stride(0) % 4:
            return None
        return flat.view(torch.int32)
    except RuntimeError:
        return None


def dense_linear(x, dense, bias=None, row_scale=None):
    """cuBLAS ``x @ dense^T (+ bias)``, times the per-row ``row_scale``: the large-M path after a dequantization."""
    y = torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
    return y if row_scale is None else (y.float() * row_scale.float()[:, None]).to(x.dtype)


def output_buffer(x, n: int, out, atomic: bool, who: str):
    """``(out, convert)``: the ``[M, n]`` result buffer of a matmul. A given ``out`` is used as is (float32 when
    split-K accumulates into it with atomics: the caller zeroed it); otherwise a new one, zeroed float32 under
    split-K (``convert``: cast to ``x.dtype`` at the end) or ``x.dtype``."""
    if out is None:
        out = (torch.zeros if atomic else torch.empty)(x.shape[0], n, device=x.device,
                                                       dtype=torch.float32 if atomic else x.dtype)
        return out, atomic
    if atomic and out.dtype != torch.float32:
        raise ValueError(f"{who}: split-K accumulates into a zeroed float32 `out`")
    return out, False


def dequant_matmul(x, weight: PackedWeight, bias=None, row_expert=None, row_scale=None, tiles=None,
                   config: MatmulConfig | None = None, out=None):
    """``x [M, K]`` -> ``[M, N]`` in x.dtype, with the reference semantics of :func:`dequant_matmul_ref`.

    Routing: ``row_expert`` alone with M <= 16 uses one program column per expert; ``tiles`` (from
    :func:`expert_tile_map`, needs ``row_expert`` sorted into tiles) runs the grouped GEMM. ``out`` (optional
    ``[M, N]``) receives the result as is: with split-K it must be float32 and zeroed (the captured decode step
    zeroes one workspace per token); without it any float dtype.
    """
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"dequant matmul: x must be [M, {weight.k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if (x.is_cuda and row_expert is None and m >= DEQUANT_GEMM_MIN_M.get(weight.fmt, 1 << 62) and config is None
            and out is None and x.dtype != torch.float32):
        return dense_linear(x, dequantize_stack(weight, x.dtype)[0], bias, row_scale)
    if bias is not None and tuple(bias.shape) != (weight.n,):
        raise ValueError(f"dequant matmul: bias must be [{weight.n}], got {tuple(bias.shape)}")
    if row_expert is None:
        if weight.n_experts != 1:
            raise ValueError("dequant matmul: a stacked weight needs row_expert")
        route = ROUTE_DENSE
    else:
        route = ROUTE_TILES if tiles is not None else ROUTE_BY_EXPERT
        if route == ROUTE_BY_EXPERT and m > GEMV_MAX_M:
            tiles = expert_tile_map(row_expert, weight.n_experts, pick_config(m, weight, x.device).block_m)
            route = ROUTE_TILES
    cfg = config or pick_config(m, weight, x.device, route)
    if route == ROUTE_TILES:
        cfg = MatmulConfig(tiles.block_m, cfg.block_n, cfg.block_k, 1, cfg.num_warps, cfg.num_stages)
    atomic = cfg.split_k > 1
    out, convert = output_buffer(x, weight.n, out, atomic, "dequant matmul")
    if m == 0:
        return out.to(x.dtype) if convert else out
    if route == ROUTE_DENSE:
        grid_m = _cdiv(m, cfg.block_m)
    elif route == ROUTE_BY_EXPERT:
        grid_m = weight.n_experts
        if cfg.block_m < m:
            cfg = MatmulConfig(_small_block_m(m), cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps,
                               cfg.num_stages)
    else:
        grid_m = tiles.n_tiles
    q, s, z = weight.qweight, weight.scales, weight.zeros
    s = s if s is not None else q
    z = z if z is not None else q
    swn = q.stride(1)
    dummy = x
    if weight.fmt == FMT_INT4 and m == 1 and route != ROUTE_TILES and cfg.block_m == 1 and INT4_WORD_GEMV:
        words = int32_words(q)
        if words is not None:
            if route == ROUTE_DENSE:
                grid_m = 1
            _int4_gemv_kernel[(grid_m, _cdiv(weight.n, cfg.block_n), cfg.split_k)](
                x, out, words, s, z, bias if bias is not None else dummy,
                row_scale if row_scale is not None else dummy, row_expert if row_expert is not None else dummy,
                weight.n, weight.k, weight.k_padded, x.stride(1), out.stride(1), words.stride(0), words.stride(1),
                s.stride(0), s.stride(1), z.stride(0), z.stride(1), BY_EXPERT=route == ROUTE_BY_EXPERT,
                GROUP=weight.group_size, WORDS=weight.group_size // 8,
                GPI=max(1, cfg.block_k // weight.group_size), SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None,
                HAS_RSCALE=row_scale is not None, ATOMIC=atomic, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
            return out.to(x.dtype) if convert else out
    if route != ROUTE_BY_EXPERT and cfg.block_m >= 16 and (m > GEMV_MAX_M or route == ROUTE_TILES):
        swizzle = 8 if route == ROUTE_DENSE else 1
        grid_n = _cdiv(weight.n, cfg.block_n)
        _dequant_gemm_kernel[(grid_m * grid_n, cfg.split_k)](
            x, out, q, s, z, bias if bias is not None else dummy, row_scale if row_scale is not None else dummy,
            *(tiles.tensors() if tiles is not None else (dummy, dummy, dummy, dummy)),
            m, weight.n, weight.k, weight.k_padded, grid_m, grid_n, x.stride(0), x.stride(1), out.stride(0),
            out.stride(1), q.stride(0), swn, s.stride(0), s.stride(1), z.stride(0), z.stride(1),
            FMT=weight.fmt, TILES=route == ROUTE_TILES, GROUP=max(weight.group_size, 1),
            SCALE_AFTER=weight.fmt == FMT_INT4 and weight.group_size % cfg.block_k == 0, SPLIT_K=cfg.split_k,
            HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None, ATOMIC=atomic,
            IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SWIZZLE=swizzle, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out.to(x.dtype) if convert else out
    grid = (grid_m, _cdiv(weight.n, cfg.block_n), cfg.split_k)
    _dequant_matmul_kernel[grid](
        x, out, q, s, z, bias if bias is not None else dummy, row_scale if row_scale is not None else dummy,
        row_expert if row_expert is not None else dummy,
        *(tiles.tensors() if tiles is not None else (dummy, dummy, dummy, dummy)),
        m, weight.n, weight.k, weight.k_padded, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        q.stride(0), swn, s.stride(0), s.stride(1), z.stride(0), z.stride(1),
        FMT=weight.fmt, ROUTE=route, GROUP=max(weight.group_size, 1),
        PRESCALE=weight.fmt == FMT_INT4 and cfg.block_k != weight.group_size, SPLIT_K=cfg.split_k, USE_DOT=cfg.use_dot,
        HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None, ATOMIC=atomic,
        IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype) if convert else out


# ---- expert tiles for the grouped GEMM ---------------------------------------------------------------------------
@dataclass
class ExpertTiles:
    """Tokens sorted by expert, cut into tiles of ``block_m`` rows that never straddle two experts.

    ``tile_expert/tile_lo/tile_hi [n_tiles]`` int32: tile t covers ``sorted_ids[tile_lo[t]:tile_hi[t]]`` of expert
    ``tile_expert[t]``; unused tiles (the bound is static: ceil(M / block_m) + E) are empty. Built on the device
    with no host synchronisation.
    """

    sorted_ids: torch.Tensor
    tile_expert: torch.Tensor
    tile_lo: torch.Tensor
    tile_hi: torch.Tensor
    block_m: int

    @property
    def n_tiles(self) -> int:
        return self.tile_expert.numel()

    def tensors(self):
        return self.tile_expert, self.tile_lo, self.tile_hi, self.sorted_ids


def expert_tile_map(row_expert: torch.Tensor, n_experts: int, block_m: int) -> ExpertTiles:
    m = row_expert.numel()
    idx = row_expert.long()
    sorted_ids = torch.argsort(idx, stable=True).to(torch.int32)
    counts = torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tiles_per = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per, 0)
    t = torch.arange(_cdiv(m, block_m) + n_experts, device=idx.device)
    e = torch.searchsorted(tile_end, t, right=True)
    used = e < n_experts
    ec = e.clamp(max=n_experts - 1)
    lo = starts[ec] + (t - (tile_end[ec] - tiles_per[ec])) * block_m
    hi = torch.minimum(lo + block_m, ends[ec])
    lo = torch.where(used, lo, torch.zeros_like(lo))
    hi = torch.where(used, hi, torch.zeros_like(hi))
    return ExpertTiles(sorted_ids, ec.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32), block_m)
