"""Dequantization of a whole packed stack to a dense ``[E, N, K]`` tensor, and the cuBLAS matmul after it: the
large-M prefill path of the int8/int4 matmul (:data:`qmamba.kernels.matmul_configs.DEQUANT_GEMM_MIN_M`), where one
dequantization pass costs less than the tile kernel's repeated in-register dequantization. The Triton pass on CUDA,
its PyTorch twin on the CPU; products in fp32 and one rounding, as the reference.
"""

from __future__ import annotations

import torch

from qmamba.kernels._triton import cdiv, jit, tl
from qmamba.kernels.dequant_gemm import plane_codes, plane_tile
from qmamba.kernels.weights import FMT_FLOAT, FMT_INT4, FMT_INT4_PLANES, FMT_INT8, PackedWeight
from qmamba.quant.layout import INT4_TILE


@jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, ROWS, K, K_PAD, swn, ssn, szn, son,
                       FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows of a packed int8/int4 matrix (experts flattened into rows) -> dense ``out [ROWS, K]``, products in fp32
    and one rounding to the output dtype (the reference's order). int4: the K tile is one group (``BLOCK_K ==
    GROUP``): contiguous packed bytes, nibbles interleaved back with ``join``, one scale and zero point per row.
    int4 plane words (``BLOCK_K == 128``, a group a multiple of it): eight stores of 16 contiguous k per row."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    r_ok = r < ROWS
    mask = r_ok[:, None] & (k < K)[None, :]
    r64 = r.to(tl.int64)
    if FMT == 3:  # plane words: nibble i of the tile's word w holds k0 + 16 i + w (one group per tile)
        words, zero, scale = plane_tile(w_ptr, s_ptr, z_ptr, 0, r64, r_ok, k0, swn, 0, ssn, 0, szn, GROUP)
        for i in tl.static_range(8):
            ki = k0 + 16 * i + tl.arange(0, 16)
            wv = plane_codes(words, zero, i, True) * scale[:, None]  # exact codes as floats
            tl.store(out_ptr + r64[:, None] * son + ki[None, :], wv.to(out_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & (ki < K)[None, :])
    else:
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


def dequantize_stack(weight: PackedWeight, dtype) -> torch.Tensor:
    """``[E, N, K]`` in ``dtype`` (products in fp32, one rounding, as the reference); for large-M prefill GEMMs.
    One Triton pass on CUDA; the PyTorch expression below is its twin and the CPU path."""
    if weight.fmt == FMT_FLOAT:
        return weight.qweight.to(dtype)
    if weight.qweight.is_cuda:
        return dequantize_stack_triton(weight, dtype)
    if weight.fmt == FMT_INT4_PLANES:
        return weight.dequantized(torch.float32).to(dtype)
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
    if weight.fmt not in (FMT_INT8, FMT_INT4, FMT_INT4_PLANES):
        raise ValueError("dequantize_stack_triton: int8 or int4 weights only")
    rows = weight.n_experts * weight.n
    q = weight.qweight.reshape(rows, -1)  # the layouts are contiguous: experts flatten into rows
    s = weight.scales.reshape(rows, -1)
    z = weight.zeros.reshape(rows, -1) if weight.zeros is not None else q
    if weight.fmt == FMT_INT4:
        block_k = weight.group_size
    elif weight.fmt == FMT_INT4_PLANES:
        block_k = INT4_TILE
    out = torch.empty(weight.n_experts, weight.n, weight.k, device=q.device, dtype=dtype)
    grid = (cdiv(rows, block_r), cdiv(weight.k_padded, block_k))
    _dequantize_kernel[grid](q, s, z, out, rows, weight.k, weight.k_padded, q.stride(0), s.stride(0), z.stride(0),
                             weight.k, FMT=weight.fmt, GROUP=max(weight.group_size, 1), BLOCK_R=block_r,
                             BLOCK_K=block_k, num_warps=4 if q.is_cuda else 1)
    return out


def dense_linear(x, dense, bias=None, row_scale=None):
    """cuBLAS ``x @ dense^T (+ bias)``, times the per-row ``row_scale``: the large-M path after a dequantization."""
    y = torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
    return y if row_scale is None else (y.float() * row_scale.float()[:, None]).to(x.dtype)
