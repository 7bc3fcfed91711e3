"""1-bit matmul over the ``binary`` layout of :mod:`qmamba.quant.layout`, in Triton, and its PyTorch twin.

``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` (``* r[n]`` in the row-scale variant), so::

    y[m, n] = sum_k s[n, k] * (alpha[k] * x[m, k])  +  sum_k beta[k] * x[m, k]        (then * r[n], + bias[n])

Four paths, picked by M (:func:`binary_matmul`):

- **word GEMV** (M = 1, and a few rows of small matrices: :class:`MatmulPolicy`; K a multiple of 32): the signs
  are read as 32-bit words and each +/-1 product is a sign-bit flip of ``-(x * alpha)`` (shift, and-xor, add; no
  multiply, no int-to-float conversion); one program row per activation row, split-K with atomics.
- **bit-position dots** (one matrix at 8..16 rows: :attr:`MatmulPolicy.binary_word_dots_min_rows`; K a multiple of
  32): the tile kernel reads the signs as 32-bit words, 16 a row per 512-column K tile, and takes bit position ``i``
  of all 16 words at once: the columns ``k0 + 32 w + i`` (w = 0..15), whose +/-1 signs are built in the input's
  float type by a shift and a logic instruction (no byte expanded into 8 lanes, no reshape, no integer-to-float
  conversion) and go to the tensor cores as the dot's left operand, against the 16 input columns at stride 32 scaled
  by alpha: 32 dots of K = 16 a tile, each weight read once for all rows. Bound by each dot's latency (the input
  tile through shared memory, the product drained before the next bit position), so it pays only where the word
  GEMV's per-row cost is larger: H100, batch-8 1-bit + int4 decode (session 32), in_proj 13.9 against 23.7 us,
  out_proj 13.0 against 13.9; routed expert stacks (by expert, which the kernel supports) lost, 44.6 / 30.7 against
  30.4 / 18.9 us, and so did batch 2 (1.465 against 0.998 ms/token a step). The same dots on an input permuted and
  scaled by a kernel of its own first, in a loop Triton pipelines, lost (H100, session 33, batch 8: 2.339 against
  1.798 ms/token) and were removed.
- **tile kernel** (other M <= 16, the interpreter, explicit configs): each K tile loads ``x``, scales it by
  ``alpha``, expands ``BLOCK_K / 8`` bytes per output row into +/-1 values (bit j of a byte is column 8 b + j;
  bit 1 = +1) and accumulates in fp32 (broadcast-multiply-reduce for one row, ``tl.dot`` for more: +/-1 is exact
  in fp16/bf16), with ``x . beta`` on the side.
- **M > 16 on CUDA**: one Triton dequantization pass to the activation dtype, then cuBLAS (one matrix) or the
  float grouped GEMM of :mod:`qmamba.kernels.quant_matmul` (experts).

Routing (:mod:`qmamba.kernels.routing`): ``ROUTE_DENSE`` (one matrix), ``ROUTE_BY_EXPERT`` (decode MoE,
graph capturable: each row reads only its expert's weights), ``ROUTE_TILES`` (prefill MoE grouped GEMM over
:func:`expert_tile_map` tiles). A routing weight per row (``row_scale``, the MoE gate) multiplies the result.

Shapes: ``x [M, K]``; stacked weights ``qweight [E, N, ceil(K/8)] uint8``, ``alpha/beta [E, K] fp16``,
``row_scale [E, N]`` (E = 1 for a plain linear), in a :class:`qmamba.kernels.weights.BinaryWeight`; tile sizes in
:mod:`qmamba.kernels.matmul_configs`. The top-1 MoE on these kernels (and on mixed 1-bit / int4 / int8 / float
experts) is :func:`qmamba.kernels.fused_moe.moe_forward`; the ``qmamba::binary_matmul`` custom op (what the
``"triton"`` backend calls) is in :mod:`qmamba.kernels.custom_ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmamba.kernels._triton import cdiv, jit, pdl_launch, split_k_mode, split_k_range, store_or_add, tl
from qmamba.kernels.dequant_gemm import matmul_epilogue
from qmamba.kernels.dequantize import dense_linear
from qmamba.kernels.matmul_configs import (BINARY_DEQUANT_GEMM_MIN_M, GEMV_MAX_M, BinaryConfig,
                                           MatmulPolicy, binary_word_dots_tile, current_policy, pick_binary_config)
from qmamba.kernels.quant_matmul import dequant_matmul, output_buffer
from qmamba.kernels.routing import (ROUTE_BY_EXPERT, ROUTE_DENSE, ROUTE_TILES, ExpertTiles, expert_tile_map,
                                    program_rows)
from qmamba.kernels.weights import BinaryWeight, PackedWeight, int32_words
from qmamba.quant import layout


# ---- reference twin --------------------------------------------------------------------------------------------
def binary_matmul_ref(x: Tensor, weight: BinaryWeight, bias=None, row_expert=None, row_scale=None) -> Tensor:
    """``x [M, K]`` -> ``[M, N]`` in x.dtype (fp32 math) in the factored form: row m uses expert ``row_expert[m]``."""
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if row_expert is None else row_expert.long()
    S = layout.signs_pm1(weight.qweight, weight.k)[idx]                    # [M, N, K]
    xf = x.float()
    y = torch.einsum("mk,mnk->mn", xf * weight.alpha.float()[idx], S) + (xf * weight.beta.float()[idx]).sum(-1,
                                                                                                          keepdim=True)
    if weight.row_scale is not None:
        y = y * weight.row_scale.float()[idx]
    if bias is not None:
        y = y + bias.float()
    if row_scale is not None:
        y = y * row_scale.float()[:, None]
    return y.to(x.dtype)


# ---- kernel ------------------------------------------------------------------------------------------------------
WORD_DOTS_BLOCK_K = 512  # the bit-position dots' K tile: 16 words (a dot's K) of 32 columns


@jit
def _signs_at(words, i, dtype: tl.constexpr, SIGN16: tl.constexpr):
    """+/-1 in ``dtype`` from bit ``i`` (a constant or a run-time scalar) of each int32 word (bit 1 = +1): the sign
    bit of the float 1 set or not, in float32's bits then converted (exact), or (``SIGN16``, bf16 / fp16 on CUDA: the
    interpreter has no 16-bit float bit casts) in the 16-bit type's own bits. No integer-to-float conversion."""
    if SIGN16:
        one = 0x3F80 if dtype == tl.bfloat16 else 0x3C00  # 1.0 as bf16 / fp16
        bits = (((words >> i) & 1) << 15) ^ (one | 0x8000)
        return bits.to(tl.int16).to(dtype, bitcast=True)
    bits = ((words << (31 - i)) & -2147483648) ^ -1082130432  # 0xBF800000: -1.0f
    return bits.to(tl.float32, bitcast=True).to(dtype)


@jit
def _word_dots(x_ptr, w_base, a_ptr, b_ptr, e64, rows, row_ok, n, n_ok, k_lo, k_hi, K, KW, sxm, sxk, swn, sae, sbe,
               IEEE: tl.constexpr, SIGN16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` fp32: ``(x * alpha) @ S^T + x . beta`` over ``[k_lo, k_hi)`` (512-column tiles) for
    these rows and weight rows, the signs read as int32 words (bit i of word w is column 32 w + i): per tile, bit
    position i of its 16 words meets the 16 input columns ``k0 + 32 w + i`` in one tensor-core dot (the signs the
    left operand, in registers); ``x . beta`` from the tile's contiguous input once."""
    wj = tl.arange(0, 16)
    kt = tl.arange(0, 512)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_beta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dt = tl.float32 if IEEE else x_ptr.dtype.element_ty
    for k0 in range(k_lo, k_hi, 512):
        wi = k0 // 32 + wj
        words = tl.load(w_base + n[:, None] * swn + wi[None, :], mask=n_ok[:, None] & (wi < KW)[None, :], other=0)
        kk = k0 + kt
        xt = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk, mask=row_ok[:, None] & (kk < K)[None, :],
                     other=0.0).to(tl.float32)
        acc_beta += tl.sum(xt * tl.load(b_ptr + e64 * sbe + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :], 1)
        for i in tl.static_range(32):
            ki = k0 + 32 * wj + i
            k_ok = ki < K
            xi = tl.load(x_ptr + rows[:, None] * sxm + ki[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            ai = tl.load(a_ptr + e64 * sae + ki, mask=k_ok, other=0.0).to(tl.float32)
            signs = _signs_at(words, i, dt, SIGN16)
            xa = (xi * ai[None, :]).to(dt)
            if IEEE:
                acc += tl.dot(signs, tl.trans(xa), input_precision="ieee")
            else:
                acc += tl.dot(signs, tl.trans(xa))
    return tl.trans(acc) + acc_beta[:, None]


@jit
def _byte_tiles(x_ptr, q_base, a_ptr, b_ptr, e64, rows, row_ok, n, n_ok, k_end, K, KB, sxm, sxk, sqn, sae, sbe,
                USE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` fp32: ``(x * alpha) @ S^T + x . beta`` over K, the signs read as bytes (``KB`` a row)
    and expanded to +/-1 a K tile (bit j of byte b is column 8 b + j)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_beta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    kb = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * sxm + k[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        alpha = tl.load(a_ptr + e64 * sae + k, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + e64 * sbe + k, mask=k_ok, other=0.0).to(tl.float32)
        acc_beta += tl.sum(x * beta[None, :], axis=1)
        xa = x * alpha[None, :]
        byte_idx = k0 // 8 + kb
        packed = tl.load(q_base + n[:, None] * sqn + byte_idx[None, :], mask=n_ok[:, None] & (byte_idx < KB)[None, :],
                         other=0).to(tl.int32)
        bits = (packed[:, :, None] >> shifts[None, None, :]) & 1          # [BLOCK_N, BLOCK_K // 8, 8]
        s = tl.reshape(bits * 2 - 1, (BLOCK_N, BLOCK_K))                  # +/-1, column 8 b + j
        if USE_DOT:
            if IEEE:
                acc += tl.dot(xa, tl.trans(s.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xa.to(x_ptr.dtype.element_ty), tl.trans(s.to(x_ptr.dtype.element_ty)))
        else:
            acc += tl.sum(xa[:, None, :] * s.to(tl.float32)[None, :, :], axis=2)
    return acc + acc_beta[:, None]


@jit
def _binary_matmul_kernel(
    x_ptr, out_ptr, q_ptr, a_ptr, b_ptr, r_ptr, bias_ptr, rscale_ptr, rexp_ptr, tile_e_ptr, tile_lo_ptr,
    tile_hi_ptr, sorted_ptr, M, N, K, KB, sxm, sxk, som, son, sqe, sqn, sae, sbe, sre,
    ROUTE: tl.constexpr, USE_DOT: tl.constexpr, HAS_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RSCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, WORD_DOTS: tl.constexpr = False, SIGN16: tl.constexpr = False,
    SPLIT_K: tl.constexpr = 1, ATOMIC: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """The 1-bit tile kernel: program (row tile / expert, BLOCK_N weight rows) over all of K. ``WORD_DOTS``
    (``q_ptr`` the signs as int32 words ``[E, N, KB]``: ``KB`` and the strides ``sqe`` / ``sqn`` in words): the
    bit-position dots of the module docstring, split ``SPLIT_K`` ways along K (program axis 2; ``ATOMIC``:
    :func:`store_or_add` into a zeroed fp32 ``out``); else bytes (``KB`` a row) expanded to +/-1 per K tile.
    ``PDL``: a programmatic dependent launch, which waits for the kernel before it before reading anything."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows, row_ok, expert = program_rows(pid_m, M, rexp_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, sorted_ptr, ROUTE,
                                        BLOCK_M)
    n_rows = tl.sum(row_ok.to(tl.int32), axis=0)
    k_end = tl.where(n_rows > 0, K, 0)  # an expert without rows reads nothing
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    e64 = expert.to(tl.int64)
    q_base = q_ptr + e64 * sqe
    if WORD_DOTS:
        t_lo, t_hi = split_k_range(pid_k, tl.cdiv(k_end, BLOCK_K), SPLIT_K)
        acc = _word_dots(x_ptr, q_base, a_ptr, b_ptr, e64, rows, row_ok, n, n_ok, t_lo * BLOCK_K,
                         tl.minimum(t_hi * BLOCK_K, k_end), K, KB, sxm, sxk, sqn, sae, sbe, IEEE, SIGN16, BLOCK_M,
                         BLOCK_N)
    else:
        acc = _byte_tiles(x_ptr, q_base, a_ptr, b_ptr, e64, rows, row_ok, n, n_ok, k_end, K, KB, sxm, sxk, sqn, sae,
                          sbe, USE_DOT, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    # the row scale r[e, n] as int8's (FMT 1: HAS_ROW, True == 1)
    matmul_epilogue(acc, out_ptr, r_ptr, bias_ptr, rscale_ptr, rows, row_ok, n, n_ok, e64, pid_k, som, son, sre, 1,
                    HAS_ROW, HAS_BIAS, HAS_RSCALE, ATOMIC)


@jit
def _binary_gemv_kernel(
    x_ptr, out_ptr, w_ptr, a_ptr, b_ptr, r_ptr, bias_ptr, rscale_ptr, rexp_ptr, N, K, KW, sxm, sxk, som, son,
    swe, swn, sae, sbe, sre, BY_EXPERT: tl.constexpr, WPI: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):
    """1-bit GEMV, one activation row per program row (decode, M <= 16): the signs are read as 32-bit words
    (32 columns each, bit i of word w is column 32 w + i) and a +/-1 product costs no multiply: the sign bit of
    ``-(x * alpha)`` is flipped where the weight bit is 1, so ``s * x * alpha`` is one shift, one and-xor and one
    add per weight. ``x . beta`` accumulates beside it from contiguous loads. Each iteration reads ``WPI`` words of
    ``BLOCK_N`` rows. ``BY_EXPERT``: row m reads the weights of expert ``row_expert[m]`` (decode MoE). ``PDL``: a
    programmatic dependent launch, which waits for the kernel before it before reading anything."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if BY_EXPERT:
        expert = tl.load(rexp_ptr + row)
    else:
        expert = row * 0
    e64 = expert.to(tl.int64)
    x_row = x_ptr + row.to(tl.int64) * sxm
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    j = tl.arange(0, WPI)
    kv = tl.arange(0, WPI * 32)
    iters = tl.cdiv(KW, WPI)
    it_lo, it_hi = split_k_range(pid_k, iters, SPLIT_K)
    a_row = a_ptr + e64 * sae
    w_rows = w_ptr + e64 * swe + n[:, None] * swn
    acc = tl.zeros((BLOCK_N, WPI), dtype=tl.float32)
    acc_b = tl.zeros((WPI * 32,), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        wi = it * WPI + j
        word = tl.load(w_rows + wi[None, :], mask=n_ok[:, None] & (wi < KW)[None, :], other=0)
        kc = it * WPI * 32 + kv
        kc_ok = kc < K
        acc_b += tl.load(x_row + kc * sxk, mask=kc_ok, other=0.0).to(tl.float32) * tl.load(
            b_ptr + e64 * sbe + kc, mask=kc_ok, other=0.0).to(tl.float32)
        for i in tl.static_range(32):
            k = wi * 32 + i
            k_ok = k < K
            xa = tl.load(x_row + k * sxk, mask=k_ok, other=0.0).to(tl.float32) * tl.load(
                a_row + k, mask=k_ok, other=0.0).to(tl.float32)
            neg = (-xa).to(tl.int32, bitcast=True)
            acc += (((word << (31 - i)) & -2147483648) ^ neg[None, :]).to(tl.float32, bitcast=True)
    res = tl.sum(acc, axis=1) + tl.sum(acc_b, axis=0)
    if HAS_ROW:
        res = res * tl.load(r_ptr + e64 * sre + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        res += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_RSCALE:
        res = res * tl.load(rscale_ptr + row).to(tl.float32)
    out_row = out_ptr + row.to(tl.int64) * som
    store_or_add(out_row + n * son, res, n_ok, ATOMIC)


@jit
def _dequantize_binary_kernel(q_ptr, a_ptr, b_ptr, r_ptr, out_ptr, R, N, K, KB, sqr, HAS_ROW: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``W_hat`` rows ``[R = E * N, K]`` from the packed signs (alpha/beta of row r's expert ``r // N``)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    r_ok = r < R
    packed = tl.load(q_ptr + r[:, None].to(tl.int64) * sqr + kb[None, :], mask=r_ok[:, None] & (kb < KB)[None, :],
                     other=0).to(tl.int32)
    bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    s = tl.reshape(bits, (BLOCK_R, BLOCK_K)).to(tl.float32) * 2.0 - 1.0
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    e = (r // N).to(tl.int64)
    mask = r_ok[:, None] & k_ok[None, :]
    alpha = tl.load(a_ptr + e[:, None] * K + k[None, :], mask=mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + e[:, None] * K + k[None, :], mask=mask, other=0.0).to(tl.float32)
    w = alpha * s + beta
    if HAS_ROW:
        w = w * tl.load(r_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + r[:, None].to(tl.int64) * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_binary_triton(weight: "BinaryWeight", dtype=torch.bfloat16) -> Tensor:
    """``W_hat [E, N, K]`` in ``dtype`` in one Triton pass (twin: :meth:`BinaryWeight.dequantized`)."""
    e, n, k = weight.n_experts, weight.n, weight.k
    q = weight.qweight.reshape(e * n, -1)
    out = torch.empty(e, n, k, device=q.device, dtype=dtype)
    block_r, block_k = (32, 128) if q.is_cuda else (16, 64)
    r = weight.row_scale
    _dequantize_binary_kernel[(cdiv(e * n, block_r), cdiv(k, block_k))](
        q, weight.alpha.contiguous(), weight.beta.contiguous(), r.reshape(-1) if r is not None else q, out, e * n,
        n, k, q.shape[1], q.stride(0), HAS_ROW=r is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=4 if q.is_cuda else 1)
    return out


def binary_matmul(x: Tensor, weight: BinaryWeight, bias=None, row_expert=None, row_scale=None,
                  tiles: ExpertTiles | None = None, config: BinaryConfig | None = None, out=None,
                  policy: MatmulPolicy | None = None, pdl: bool = False) -> Tensor:
    """``x [M, K]`` -> ``[M, N]`` in x.dtype, semantics of :func:`binary_matmul_ref` (routing as ``dequant_matmul``).

    Paths: the word GEMV (M = 1, or M <= 8 on small matrices; split-K), the tile kernel (other M <= 16, and
    everywhere on the interpreter or with an explicit ``config``), and on CUDA above 16 rows one Triton
    dequantization pass followed by cuBLAS (one matrix) or the float grouped GEMM (experts).
    ``out`` (optional ``[M, N]``) receives the result as is: with split-K it must be float32 and zeroed; otherwise
    any float dtype. ``policy``: which kernel paths may be taken (:class:`MatmulPolicy`; None:
    :func:`current_policy`). ``pdl`` (Hopper and newer, inside the decode step's CUDA graph): the word GEMV and the
    tile kernel launch as programmatic dependents (each waits for the kernel before it before reading anything); the
    paths above 16 rows launch as usual."""
    policy = policy or current_policy()
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"binary matmul: x must be [M, {weight.k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if row_expert is None:
        if weight.n_experts != 1:
            raise ValueError("binary matmul: a stacked weight needs row_expert")
        route = ROUTE_DENSE
    else:
        route = ROUTE_TILES if tiles is not None else ROUTE_BY_EXPERT
    if (x.is_cuda and m >= BINARY_DEQUANT_GEMM_MIN_M and config is None and out is None and x.dtype != torch.float32):
        dense = dequantize_binary_triton(weight, x.dtype)
        if route == ROUTE_DENSE:
            return dense_linear(x, dense[0], bias, row_scale)
        return dequant_matmul(x, PackedWeight.from_float(dense), bias, row_expert=row_expert, row_scale=row_scale,
                              tiles=tiles)
    if config is None and route == ROUTE_DENSE and max(2, policy.binary_word_dots_min_rows) <= m <= GEMV_MAX_M:
        words = int32_words(weight.qweight) if weight.k % 32 == 0 else None
        if words is not None:
            return _word_dots_matmul(x, weight, words, bias, row_scale, out, policy.split_k_atomic_sem, pdl)
    cfg = config or pick_binary_config(m, weight, x.device, policy)
    if cfg.block_k % 8:
        raise ValueError("binary matmul: BLOCK_K must be a multiple of 8")
    words = None
    if (m <= GEMV_MAX_M and route != ROUTE_TILES and cfg.block_m == 1 and policy.binary_word_gemv
            and cfg.block_k % 32 == 0):
        words = int32_words(weight.qweight)
    if words is None:
        cfg = BinaryConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)  # no split-K
    if route == ROUTE_BY_EXPERT and m > GEMV_MAX_M:
        tiles = expert_tile_map(row_expert, weight.n_experts, cfg.block_m)
        route = ROUTE_TILES
    if route == ROUTE_TILES:
        cfg = BinaryConfig(tiles.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
    if route == ROUTE_BY_EXPERT and cfg.block_m < m and words is None:
        cfg = BinaryConfig(16, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
    atomic = cfg.split_k > 1
    out, convert = output_buffer(x, weight.n, out, atomic, "binary matmul")
    if m == 0:
        return out.to(x.dtype) if convert else out
    q, a, b, r = weight.qweight, weight.alpha, weight.beta, weight.row_scale
    dummy = x
    if words is not None:
        _binary_gemv_kernel[(m, cdiv(weight.n, cfg.block_n), cfg.split_k)](
            x, out, words, a, b, r if r is not None else a, bias if bias is not None else dummy,
            row_scale if row_scale is not None else dummy, row_expert if row_expert is not None else dummy,
            weight.n, weight.k, words.shape[-1], x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            words.stride(0), words.stride(1), a.stride(0), b.stride(0), r.stride(0) if r is not None else 0,
            BY_EXPERT=route == ROUTE_BY_EXPERT, WPI=cfg.block_k // 32, SPLIT_K=cfg.split_k, HAS_ROW=r is not None,
            HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None,
            ATOMIC=split_k_mode(atomic, policy.split_k_atomic_sem), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, PDL=pdl, **pdl_launch(pdl))
        return out.to(x.dtype) if convert else out
    grid_m = {ROUTE_DENSE: lambda: cdiv(m, cfg.block_m), ROUTE_BY_EXPERT: lambda: weight.n_experts,
              ROUTE_TILES: lambda: tiles.n_tiles}[route]()
    _binary_matmul_kernel[(grid_m, cdiv(weight.n, cfg.block_n))](
        x, out, q, a, b, r if r is not None else a, bias if bias is not None else dummy,
        row_scale if row_scale is not None else dummy, row_expert if row_expert is not None else dummy,
        *(tiles.tensors() if tiles is not None else (dummy, dummy, dummy, dummy)),
        m, weight.n, weight.k, q.shape[-1], x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        q.stride(0), q.stride(1), a.stride(0), b.stride(0), r.stride(0) if r is not None else 0,
        ROUTE=route, USE_DOT=cfg.block_m > 1, HAS_ROW=r is not None, HAS_BIAS=bias is not None,
        HAS_RSCALE=row_scale is not None, IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, PDL=pdl,
        **pdl_launch(pdl))
    return out


def _word_dots_matmul(x, weight: BinaryWeight, words, bias, row_scale, out, sem: str, pdl: bool = False):
    """The bit-position dots of the tile kernel on one matrix (2 <= M <= 16; ``words`` the signs as int32
    ``[1, N, K / 32]``): program rows of 16 input rows x weight-row blocks x K splits (:func:`binary_word_dots_tile`;
    atomic adds into a zeroed float32 ``out``, as the word GEMV's split-K; a given ``out`` of another type is not
    split)."""
    grid_m = cdiv(x.shape[0], GEMV_MAX_M)
    block_n, warps, split = binary_word_dots_tile(weight.n, weight.k, grid_m, x.device)
    if out is not None and out.dtype != torch.float32:
        split = 1
    out, convert = output_buffer(x, weight.n, out, split > 1, "binary matmul")
    a, b, r = weight.alpha, weight.beta, weight.row_scale
    dummy = x
    _binary_matmul_kernel[(grid_m, cdiv(weight.n, block_n), split)](
        x, out, words, a, b, r if r is not None else a, bias if bias is not None else dummy,
        row_scale if row_scale is not None else dummy, dummy, dummy, dummy, dummy, dummy, x.shape[0], weight.n,
        weight.k, words.shape[-1], x.stride(0), x.stride(1), out.stride(0), out.stride(1), words.stride(0),
        words.stride(1), a.stride(0), b.stride(0), r.stride(0) if r is not None else 0,
        ROUTE=ROUTE_DENSE, USE_DOT=True, HAS_ROW=r is not None, HAS_BIAS=bias is not None,
        HAS_RSCALE=row_scale is not None, IEEE=x.dtype == torch.float32, BLOCK_M=GEMV_MAX_M, BLOCK_N=block_n,
        BLOCK_K=WORD_DOTS_BLOCK_K, WORD_DOTS=True, SIGN16=x.is_cuda and x.dtype in (torch.bfloat16, torch.float16),
        SPLIT_K=split, ATOMIC=split_k_mode(split > 1, sem), num_warps=warps, num_stages=1, PDL=pdl,
        **pdl_launch(pdl))
    return out.to(x.dtype) if convert else out
