"""Dequantizing matmul ``y = x @ W_hat^T`` over the packed layouts of :mod:`qmamba.quant.layout`, in Triton: the
small-M tile kernel and :func:`dequant_matmul`, which picks the kernel for each call.

The tile kernel's compile-time switches pick

* the weight format: ``FMT_FLOAT`` (a plain ``[E, N, K]`` float tensor), ``FMT_INT8`` (per-row scale, applied in the
  epilogue) or ``FMT_INT4`` (MatMulNBits layout; the K tile is one quantization group, so the integer codes minus
  the zero point go through the dot exactly and the group's fp16 scale multiplies the partial product);
* the inner product: a broadcast-multiply-reduce for a single row (GEMV, M = 1) or ``tl.dot`` on tensor cores
  (16-row tiles for 2 <= M <= 16);
* how rows find their weights (:mod:`qmamba.kernels.routing`): one matrix, one program column per expert (decode
  MoE) or expert tiles;
* split-K (``SPLIT_K > 1``: fp32 atomics into a zeroed buffer) for matrices too narrow to fill the GPU.

Beside it, by M and format: the int4 word GEMV (:mod:`qmamba.kernels.int4_gemv`, M = 1 on CUDA), the prefill GEMM
(:mod:`qmamba.kernels.dequant_gemm`, M > 16 and expert tiles) and, for large M on CUDA, one dequantization pass
then cuBLAS (:mod:`qmamba.kernels.dequantize`). Tile sizes and thresholds: :mod:`qmamba.kernels.matmul_configs`;
which paths may be taken: its :class:`MatmulPolicy` (an argument). Weight records: :mod:`qmamba.kernels.weights`.

Shapes: ``x [M, K]`` (any float dtype; fp32 is for CPU interpreter tests), weights ``[E, N, ...]`` (E = 1 for a
plain linear). The pure-PyTorch twin is :func:`dequant_matmul_ref`.
"""

from __future__ import annotations

import torch

from qmamba.kernels._triton import cdiv, jit, pdl_launch, split_k_mode, split_k_range, tl
from qmamba.kernels.dequant_gemm import (dequant_gemm, matmul_epilogue, plane_pairs_args,
                                         plane_position_codes, plane_tile, weight_times_rows)
from qmamba.kernels.dequantize import dense_linear, dequantize_stack
from qmamba.kernels.int4_gemv import int4_gemv
from qmamba.kernels.matmul_configs import (DEQUANT_GEMM_MIN_M, GEMV_MAX_M, MatmulConfig, MatmulPolicy,
                                           current_policy, gemm_config, pick_config, small_block_m)
from qmamba.kernels.routing import ROUTE_BY_EXPERT, ROUTE_DENSE, ROUTE_TILES, expert_tile_map, program_rows
from qmamba.kernels.w4a8_gemm import w4a8_linear
from qmamba.kernels.weights import FMT_FLOAT, FMT_INT4, FMT_INT4_PLANES, FMT_INT8, PackedWeight, int32_words


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
def _tile_times_rows(w, x, rm, USE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr):
    """``[BN, BLOCK_M]`` fp32: a weight tile ``w [BN, BK]`` (dequantized, or exact codes) times the input rows
    ``x [BLOCK_M, BK]``: on tensor cores (the weight rounded to the input's type; fp32 inputs exactly), or for a
    single row a broadcast-multiply-reduce per row."""
    if USE_DOT:
        part = weight_times_rows(w, x, IEEE)
    else:
        part = tl.zeros((w.shape[0], BLOCK_M), dtype=tl.float32)
        for r in tl.static_range(BLOCK_M):
            x_r = tl.sum(tl.where(rm[:, None] == r, x.to(tl.float32), 0.0), axis=0)
            part += tl.where(rm[None, :] == r, tl.sum(w.to(tl.float32) * x_r[None, :], axis=1)[:, None], 0.0)
    return part


@jit
def _dequant_matmul_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, rexp_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
    sorted_ptr, M, N, K, K_PAD, sxm, sxk, som, son, swe, swn, sse, ssn, sze, szn,
    FMT: tl.constexpr, ROUTE: tl.constexpr, GROUP: tl.constexpr, PRESCALE: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLOAT_CODES: tl.constexpr,
    PAIRS: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr, PDL: tl.constexpr, EARLY_TILE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    if EARLY_TILE:  # (one matrix of int4 plane words) this split's first K tile, before the wait below
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        e_lo, e_hi = split_k_range(pid_k, tl.cdiv(K_PAD, BLOCK_K), SPLIT_K)
        e_ok = n < tl.where(e_lo < e_hi, N, 0)  # no rows where the split has no tile
        e_words, e_zero, e_scale = plane_tile(w_ptr, s_ptr, z_ptr, 0, n, e_ok, e_lo * BLOCK_K, swn, sse, ssn, sze,
                                              szn, GROUP)
    if PDL:  # a programmatic dependent launch: wait for the kernel before (its rows, experts, input) first
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # -- which rows, which expert
    rows, row_ok, expert = program_rows(pid_m, M, rexp_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, sorted_ptr, ROUTE,
                                        BLOCK_M)
    n_rows = tl.sum(row_ok.to(tl.int32), axis=0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    # -- this split's K range (whole tiles); no rows -> empty loop
    t_lo, t_hi = split_k_range(pid_k, tl.cdiv(K_PAD, BLOCK_K), SPLIT_K)
    k_lo, k_hi = t_lo * BLOCK_K, tl.minimum(t_hi * BLOCK_K, K_PAD)
    k_hi = tl.where(n_rows > 0, k_hi, k_lo)
    w_base = w_ptr + expert.to(tl.int64) * swe
    # the weight is the dot's left operand (it can stay in registers after dequantization): acc is [BLOCK_N,
    # BLOCK_M] on the tensor-core path, a [BLOCK_N] vector on the single-row path
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    e64 = expert.to(tl.int64)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FMT == 3:
            # int4 plane words (BLOCK_K = 128, one group per tile): nibble i of word w holds k = k0 + 16 i + w, so
            # each nibble position meets 16 contiguous inputs; exact codes minus the zero point (as floats by the
            # 2^23 trick where FLOAT_CODES), group scale after; or two at a time where PAIRS (2: scaled, straight
            # into the accumulator)
            if EARLY_TILE:  # the first tile was read before the wait
                first = k0 == k_lo
                later = n < tl.where(k0 != k_lo, N, 0)  # rows to read: none in the first tile
                words, zero, scale = plane_tile(w_base, s_ptr, z_ptr, e64, n, later, k0, swn, sse, ssn, sze, szn,
                                                GROUP)
                words = tl.where(first, e_words, words)
                zero = tl.where(first, e_zero, zero)
                scale = tl.where(first, e_scale, scale)
            else:
                words, zero, scale = plane_tile(w_base, s_ptr, z_ptr, e64, n, n_ok, k0, swn, sse, ssn, sze, szn,
                                                GROUP)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for i in tl.static_range(8):
                ki = k0 + 16 * i + tl.arange(0, 16)
                xi = tl.load(x_ptr + rows[:, None] * sxm + ki[None, :] * sxk,
                             mask=row_ok[:, None] & (ki < K)[None, :], other=0.0)
                codes = plane_position_codes(words, zero, scale, i, PAIRS, FLOAT_CODES, ASM, FP16)
                if PAIRS == 2:
                    acc += _tile_times_rows(codes, xi, rm, USE_DOT, IEEE, BLOCK_M)
                else:
                    part += _tile_times_rows(codes, xi, rm, USE_DOT, IEEE, BLOCK_M)
            if PAIRS != 2:
                acc += part * scale[:, None]
        elif FMT == 2:
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
            acc += _tile_times_rows(w, x, rm, USE_DOT, IEEE, BLOCK_M)
    acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    # -- epilogue
    matmul_epilogue(acc, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows, row_ok, n, n_ok, e64, pid_k, som, son, sse, ssn,
                    FMT, HAS_BIAS, HAS_RSCALE, ATOMIC)


# ---- launcher ----------------------------------------------------------------------------------------------------
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


def experts_via_dense(x, weight: PackedWeight, bias, row_expert, row_scale, tiles=None, whole_stack: bool = False):
    """A routed stack expert by expert: that expert's matrix dequantized to ``x.dtype`` (one pass), then the float
    tile kernel on that expert's row tiles only. One dense matrix at a time (not the stack): the temporary is one
    expert's weight. ``whole_stack``: every expert in one pass, then one grouped GEMM over all tiles (two launches;
    the temporary is the whole stack)."""
    m = x.shape[0]
    dense_cfg = gemm_config(m, PackedWeight(FMT_FLOAT, weight.n, weight.k, 1, x), x.device)
    if tiles is None:
        tiles = expert_tile_map(row_expert, weight.n_experts, dense_cfg.block_m)
    cfg = MatmulConfig(tiles.block_m, dense_cfg.block_n, dense_cfg.block_k, 1, dense_cfg.num_warps,
                       dense_cfg.num_stages)
    out = torch.empty(m, weight.n, device=x.device, dtype=x.dtype)
    if whole_stack:
        dense = PackedWeight.from_float(dequantize_stack(weight, x.dtype))
        dequant_gemm(x, dense, out, bias, row_scale, tiles, cfg, False)
        return out
    for e in range(weight.n_experts):
        dense = dequantize_stack(weight.expert(e), x.dtype)
        dequant_gemm(x, PackedWeight.from_float(dense), out, bias, row_scale, tiles, cfg, False, only_expert=e)
    return out


def dequant_matmul(x, weight: PackedWeight, bias=None, row_expert=None, row_scale=None, tiles=None,
                   config: MatmulConfig | None = None, out=None, policy: MatmulPolicy | None = None,
                   gate: str | None = None, pdl: bool = False, early_tile: bool = False, x_int8=None):
    """``x [M, K]`` -> ``[M, N]`` in x.dtype, with the reference semantics of :func:`dequant_matmul_ref`.

    Routing: ``row_expert`` alone with M <= 16 uses one program column per expert; ``tiles`` (from
    :func:`expert_tile_map`, needs ``row_expert`` sorted into tiles) runs the grouped GEMM. ``out`` (optional
    ``[M, N]``) receives the result as is: with split-K it must be float32 and zeroed (the captured decode step
    zeroes one workspace per token); without it any float dtype. ``policy``: which kernel paths may be taken
    (None: :func:`current_policy`). ``gate`` (an activation name; with ``row_expert`` and ``tiles`` only, the
    grouped GEMM): ``weight`` is a gated fc1 (2F rows: gate, then up) and the result ``[M, F]`` is ``act(h[:, :F]) *
    h[:, F:]`` of ``h = x @ W^T``, computed in the GEMM's epilogue (:func:`qmamba.kernels.dequant_gemm.gated_epilogue`).
    ``pdl`` (Hopper and newer, inside the decode step's CUDA graph): the small-M tile kernel is launched as a
    programmatic dependent of the kernel before it and waits for it before reading anything, then lets the next one
    start (the order every PDL kernel of the step keeps); the other paths (prefill GEMM, word GEMV, dequantization
    pass + cuBLAS) launch as usual, which is always safe. ``early_tile`` (one matrix of int4 plane words, the small-M
    kernel): each program reads its first K tile of the weight first, before that wait (a float tile would hold ~64
    more registers a thread through the loop: not offered). ``x_int8`` (the W4A8 path only,
    ``MatmulPolicy.w4a8_min_m``; elsewhere a ValueError): x already quantized per row, the ``(codes, scale, sums)``
    of :func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8` (the MoE prefill's fc1 input, from its routing kernel:
    :func:`qmamba.kernels.fused_moe.route_top1_int8`), which :func:`w4a8_linear` multiplies instead of quantizing x.
    """
    policy = policy or current_policy()
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"dequant matmul: x must be [M, {weight.k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if gate is not None and (tiles is None or row_expert is None or tiles.block_m < 16 or weight.n % 2):
        raise ValueError("dequant matmul: a gated epilogue needs row_expert with its expert tiles (of at least 16 "
                         "rows) and a weight of 2F rows")
    if bias is not None and tuple(bias.shape) != (weight.n,):
        raise ValueError(f"dequant matmul: bias must be [{weight.n}], got {tuple(bias.shape)}")
    if config is None and out is None and policy.takes_w4a8(m, weight, routed=row_expert is not None):
        return w4a8_linear(x, weight, bias, row_expert, row_scale, tiles, gate=gate,  # int8 activations
                           tile=policy.w4a8_tile, x_int8=x_int8)
    if x_int8 is not None:
        raise ValueError("dequant matmul: x_int8 (x quantized per row) is for the W4A8 path, which this call does not "
                         "take (MatmulPolicy.w4a8_min_m, an int4 plane-word weight, no config or out)")
    if (x.is_cuda and row_expert is None and m >= DEQUANT_GEMM_MIN_M.get(weight.fmt, 1 << 62) and config is None
            and out is None and x.dtype != torch.float32):
        return dense_linear(x, dequantize_stack(weight, x.dtype)[0], bias, row_scale)
    if (x.is_cuda and row_expert is not None and weight.fmt in (FMT_INT8, FMT_INT4, FMT_INT4_PLANES)
            and m >= policy.dequant_experts_min_m and config is None and out is None and x.dtype != torch.float32
            and gate is None):
        return experts_via_dense(x, weight, bias, row_expert, row_scale, tiles,
                                 whole_stack=policy.dequant_experts_whole_stack)
    if row_expert is None:
        if weight.n_experts != 1:
            raise ValueError("dequant matmul: a stacked weight needs row_expert")
        route = ROUTE_DENSE
    else:
        route = ROUTE_TILES if tiles is not None else ROUTE_BY_EXPERT
        if route == ROUTE_BY_EXPERT and m > GEMV_MAX_M:
            tiles = expert_tile_map(row_expert, weight.n_experts,
                                    pick_config(m, weight, x.device, policy=policy).block_m)
            route = ROUTE_TILES
    cfg = config or pick_config(m, weight, x.device, route, policy)
    if route == ROUTE_TILES:
        cfg = MatmulConfig(tiles.block_m, cfg.block_n, cfg.block_k, 1, cfg.num_warps, cfg.num_stages)
    atomic = cfg.split_k > 1
    out, convert = output_buffer(x, weight.n // 2 if gate is not None else weight.n, out, atomic, "dequant matmul")
    if m == 0:
        return out.to(x.dtype) if convert else out
    if route == ROUTE_DENSE:
        grid_m = cdiv(m, cfg.block_m)
    elif route == ROUTE_BY_EXPERT:
        grid_m = weight.n_experts
        if cfg.block_m < m:
            cfg = MatmulConfig(small_block_m(m), cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps,
                               cfg.num_stages)
    else:
        grid_m = tiles.n_tiles
    if weight.fmt == FMT_INT4 and m == 1 and route != ROUTE_TILES and cfg.block_m == 1 and policy.int4_word_gemv:
        words = int32_words(weight.qweight)
        if words is not None:
            int4_gemv(x, words, weight, out, bias, row_scale, row_expert, cfg, atomic, policy.split_k_atomic_sem)
            return out.to(x.dtype) if convert else out
    if route != ROUTE_BY_EXPERT and cfg.block_m >= 16 and (m > GEMV_MAX_M or route == ROUTE_TILES):
        dequant_gemm(x, weight, out, bias, row_scale, tiles if route == ROUTE_TILES else None, cfg, atomic,
                     plane_float_codes=policy.plane_float_codes, plane_weight_left=policy.plane_weight_left,
                     atomic_sem=policy.split_k_atomic_sem, plane_code_pairs=policy.plane_gemm_code_pairs, gate=gate)
        return out.to(x.dtype) if convert else out
    q, s, z = weight.qweight, weight.scales, weight.zeros
    s = s if s is not None else q
    z = z if z is not None else q
    swn = q.stride(1)
    dummy = x
    grid = (grid_m, cdiv(weight.n, cfg.block_n), cfg.split_k)
    _dequant_matmul_kernel[grid](
        x, out, q, s, z, bias if bias is not None else dummy, row_scale if row_scale is not None else dummy,
        row_expert if row_expert is not None else dummy,
        *(tiles.tensors() if tiles is not None else (dummy, dummy, dummy, dummy)),
        m, weight.n, weight.k, weight.k_padded, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        q.stride(0), swn, s.stride(0), s.stride(1), z.stride(0), z.stride(1),
        FMT=weight.fmt, ROUTE=route, GROUP=max(weight.group_size, 1),
        PRESCALE=weight.fmt == FMT_INT4 and cfg.block_k != weight.group_size, SPLIT_K=cfg.split_k, USE_DOT=cfg.use_dot,
        HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None,
        ATOMIC=split_k_mode(atomic, policy.split_k_atomic_sem), IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        FLOAT_CODES=policy.plane_float_codes and x.dtype != torch.float32,
        **plane_pairs_args(policy.plane_code_pairs, weight, x), PDL=pdl,
        EARLY_TILE=early_tile and route == ROUTE_DENSE and weight.fmt == FMT_INT4_PLANES,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(pdl))
    return out.to(x.dtype) if convert else out
