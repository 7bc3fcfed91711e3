"""The prefill GEMM (M > 16, and the grouped GEMM of routed expert tiles) for float, int8 and int4 weights on
tensor cores, the weight tile dequantized in registers; launched by
:func:`qmamba.kernels.quant_matmul.dequant_matmul` with tiles from
:func:`qmamba.kernels.matmul_configs.gemm_config`.
"""

from __future__ import annotations

import torch

from qmamba.kernels._triton import HAS_TRITON, cdiv, jit, split_k_mode, split_k_range, store_or_add, tl
from qmamba.kernels.activations import ACTIVATION_IDS, activate
from qmamba.kernels.routing import ExpertTiles, swizzled_program
from qmamba.kernels.weights import FMT_INT4, FMT_INT4_PLANES, PackedWeight


@jit
def _row_scale_and_bias(acc, s_ptr, bias_ptr, n, n_ok, e64, pid_k, sse, ssn, FMT: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
    """``acc [BLOCK_M, BLOCK_N]`` fp32 of weight rows ``n`` times the int8 row scale, plus the bias (once, by the
    first K split)."""
    if FMT == 1:
        acc = acc * tl.load(s_ptr + e64 * sse + n * ssn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@jit
def matmul_epilogue(acc, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows, row_ok, n, n_ok, e64, pid_k, som, son, sse, ssn,
                    FMT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr):
    """The general matmuls' shared epilogue on ``acc [BLOCK_M, BLOCK_N]`` fp32: int8 row scale, bias (once, by the
    first K split), per-row scale, then :func:`store_or_add` (``ATOMIC``: :func:`split_k_mode`)."""
    acc = _row_scale_and_bias(acc, s_ptr, bias_ptr, n, n_ok, e64, pid_k, sse, ssn, FMT, HAS_BIAS)
    if HAS_RSCALE:
        acc = acc * tl.load(rscale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    store_or_add(out_ptr + rows[:, None] * som + n[None, :] * son, acc, row_ok[:, None] & n_ok[None, :], ATOMIC)


@jit
def gated_epilogue(acc, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows, row_ok, n, n_ok, e64, pid_n, F, som, son, sse,
                   ssn, FMT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The gated fc1's epilogue on ``acc [BLOCK_M, BLOCK_N]`` fp32, gate columns then up columns (weight rows ``n``,
    see ``GATE`` in :func:`_dequant_gemm_kernel`): int8 row scale and bias by weight row, then
    ``act(gate) * up`` into the tile's ``BLOCK_N / 2`` output columns through :func:`matmul_epilogue` (per-row
    scale, a plain store: no split-K, the activation needs the sums)."""
    acc = _row_scale_and_bias(acc, s_ptr, bias_ptr, n, n_ok, e64, 0, sse, ssn, FMT, HAS_BIAS)
    gate, up = tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, BLOCK_N // 2)), (0, 2, 1)))
    col = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    matmul_epilogue(activate(gate, ACT) * up, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows, row_ok, col, col < F, e64,
                    0, som, son, sse, ssn, 0, False, HAS_RSCALE, 0)


@jit
def weight_rows(pid_n, N, BLOCK_N: tl.constexpr, GATE: tl.constexpr):
    """``(n, n_ok)``: the weight rows of output block ``pid_n``, ``BLOCK_N`` consecutive rows, or for a gated fc1
    (``GATE`` >= 0, N = 2F rows: gate, then up) the gate rows c, then the up rows F + c, of the block's
    ``BLOCK_N / 2`` output columns c (the epilogue pairs them up, :func:`gated_epilogue`). Shared by the GEMM
    kernels with a gated epilogue."""
    if GATE >= 0:
        r = tl.arange(0, BLOCK_N)
        col = pid_n * (BLOCK_N // 2) + r % (BLOCK_N // 2)
        n = col + (r // (BLOCK_N // 2)) * (N // 2)
        n_ok = col < N // 2
    else:
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
    return n, n_ok


@jit
def plane_tile(w_base, s_ptr, z_ptr, e64, n, n_ok, k0, swn, sse, ssn, sze, szn, GROUP: tl.constexpr):
    """One 128-element K tile of int4 plane words for weight rows ``n`` (``w_base``: the expert's words):
    ``(words [BN, 16] int32, zero point [BN, 1] int32, scale [BN] fp32)``; the group (a multiple of the tile)
    holds the whole tile. Shared by the general matmul kernels."""
    words = tl.load(w_base + n[:, None] * swn + (k0 // 8 + tl.arange(0, 16))[None, :], mask=n_ok[:, None], other=0)
    blk = k0 // GROUP
    zb = tl.load(z_ptr + e64 * sze + n * szn + blk // 2, mask=n_ok, other=0).to(tl.int32)
    zero = ((zb >> ((blk % 2) * 4)) & 0xF)[:, None]
    scale = tl.load(s_ptr + e64 * sse + n * ssn + blk, mask=n_ok, other=0.0).to(tl.float32)
    return words, zero, scale


@jit
def plane_codes(words, zero, i: tl.constexpr, FLOAT_CODES: tl.constexpr):
    """``code - zero`` of nibble position ``i`` of a plane tile (``words [BN, 16]``, ``zero [BN, 1]`` from
    :func:`plane_tile`): ``[BN, 16]``, the 16 consecutive k = k0 + 16 i + w. ``FLOAT_CODES``: fp32, each code OR'ed
    into the mantissa of 2^23 and read as a float, minus 2^23 + zero (a logic instruction and a subtraction, no
    integer-to-float conversion); else int32."""
    nib = (words >> (4 * i)) & 0xF
    if FLOAT_CODES:
        codes = (nib | 0x4B000000).to(tl.float32, bitcast=True) - (zero.to(tl.float32) + 8388608.0)
    else:
        codes = nib - zero
    return codes


# ---- int4 plane codes two at a time (MatmulPolicy.plane_code_pairs) ---------------------------------------------
PLANE_CODE_PAIRS = {"": 0, "exact": 1, "scaled": 2}  # MatmulPolicy.plane_code_pairs -> the kernels' PAIRS


def _pair_asm(shift: int, fp16: bool, scaled: bool) -> str:
    """Inline PTX for one register of two 16-bit halves of plane words (a half holds four nibble positions: the
    low half 0..3, the high half 4..7; ``shift`` = 4 (i % 4)): shift and mask both halves' nibble into the
    mantissas of ``MAGIC + code`` (bfloat16 128, float16 1024: the spacing is 1 there), add ``-(MAGIC + zero)``
    (``$2``, exact), and with ``scaled`` multiply by the group scale (``$3``; plus -0.0, so that the FMA is one
    rounding of the exact product). Each half is computed on its own. sm_80 or newer (``fma.rn.bf16x2``)."""
    ftype, magic, one = ("f16x2", "0x64006400", "0x3C003C00") if fp16 else ("bf16x2", "0x43004300", "0x3F803F80")
    body = (f"shr.u32 t, $1, {shift}; lop3.b32 t, t, 0x000F000F, {magic}, 0xEA; mov.b32 o, {one}; "
            f"fma.rn.{ftype} t, t, o, $2; ")
    body += f"mov.b32 o, 0x80008000; fma.rn.{ftype} $0, t, $3, o;" if scaled else "mov.b32 $0, t;"
    return "{ .reg .b32 t, o; " + body + " }"


# indexed by (i % 4) + 4 fp16 + 8 scaled
_PAIR_ASM = tl.constexpr(tuple(_pair_asm(4 * (j % 4), bool(j & 4), bool(j & 8)) for j in range(16))) \
    if HAS_TRITON else None


@jit
def plane_code_pairs(words, zero, scale, i: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr,
                     FP16: tl.constexpr):
    """``code - zero`` (``SCALED``: times the group scale rounded to the input's type, one rounding) of nibble
    position ``i`` of a plane tile (``words [BN, 16]``, ``zero [BN, 1]``; ``scale [BN, 1]``, :func:`plane_tile`'s
    with a unit axis): ``[BN, 16]`` in bfloat16 (``FP16``: float16), as :func:`plane_codes`' k. ``ASM``
    (compiled CUDA, sm_80+): the words' 16-bit halves holding position ``i`` (two neighbouring words' halves a
    register, as Triton packs 16-bit elements) are unpacked two codes at a time by :func:`_pair_asm` (a shift, a
    logic instruction and a packed FMA for two codes, one FMA more scaled, against ~3.5 instructions a code for
    :func:`plane_codes`' float codes); without it (the interpreter has no inline PTX) the same values one element
    at a time."""
    dt = tl.float16 if FP16 else tl.bfloat16
    if ASM:
        if i >= 4:
            src = (words >> 16).to(tl.int16)
        else:
            src = words.to(tl.int16)
        negz = (-(zero.to(tl.float32) + (1024.0 if FP16 else 128.0))).to(dt)
        if SCALED:
            codes = tl.inline_asm_elementwise(_PAIR_ASM[i % 4 + 4 * FP16 + 8], "=r,r,r,r", [src, negz, scale.to(dt)],
                                              dtype=dt, is_pure=True, pack=2)
        else:
            codes = tl.inline_asm_elementwise(_PAIR_ASM[i % 4 + 4 * FP16], "=r,r,r", [src, negz], dtype=dt,
                                              is_pure=True, pack=2)
    else:
        q = (((words >> (4 * i)) & 0xF) - zero).to(tl.float32)
        if SCALED:
            q = q * scale.to(dt).to(tl.float32)
        codes = q.to(dt)
    return codes


@jit
def plane_position_codes(words, zero, scale, i: tl.constexpr, PAIRS: tl.constexpr, FLOAT_CODES: tl.constexpr,
                         ASM: tl.constexpr, FP16: tl.constexpr):
    """Nibble position ``i`` of a plane tile as the GEMM kernels' dot operand: two codes at a time where ``PAIRS``
    (:func:`plane_code_pairs`; 2: scaled), else :func:`plane_codes` (as floats where ``FLOAT_CODES``).
    ``PAIRS`` / ``ASM`` / ``FP16``: :func:`plane_pairs_args`."""
    if PAIRS:
        codes = plane_code_pairs(words, zero, scale[:, None], i, PAIRS == 2, ASM, FP16)
    else:
        codes = plane_codes(words, zero, i, FLOAT_CODES)
    return codes


def plane_pairs_args(mode: str, weight: PackedWeight, x) -> dict:
    """The kernels' ``PAIRS`` / ``ASM`` / ``FP16`` for a pairs mode (``MatmulPolicy.plane_code_pairs``,
    ``plane_gemm_code_pairs``), a weight and an input ``x``: int4 plane words and 16-bit inputs only (float32 inputs
    take the exact IEEE products), the PTX on CUDA only, bfloat16's from sm_80 (its packed FMA; older GPUs have no
    bfloat16 tensor cores either: the elementwise twin there)."""
    pairs = (PLANE_CODE_PAIRS[mode] if weight.fmt == FMT_INT4_PLANES and x.dtype in (torch.bfloat16, torch.float16)
             else 0)
    asm = bool(pairs) and x.is_cuda
    if asm and x.dtype == torch.bfloat16:
        asm = torch.cuda.get_device_capability(x.device)[0] >= 8
    return dict(PAIRS=pairs, ASM=asm, FP16=x.dtype == torch.float16)


@jit
def _rows_times_tile(x, w, IEEE: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` fp32 on tensor cores: input rows ``x [BLOCK_M, BK]`` times a weight tile ``w [BLOCK_N,
    BK]`` (dequantized, or exact codes) rounded to the input's type; float32 inputs exactly (IEEE)."""
    if IEEE:
        part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        part = tl.dot(x, tl.trans(w.to(x.dtype)))
    return part


@jit
def weight_times_rows(w, x, IEEE: tl.constexpr):
    """``[BLOCK_N, BLOCK_M]`` fp32, the transpose of :func:`_rows_times_tile`: the weight tile is the dot's left
    operand, which the tensor cores read from registers (no shared-memory copy of the dequantized tile). Shared
    with the small-M kernel."""
    if IEEE:
        part = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
    else:
        part = tl.dot(w.to(x.dtype), tl.trans(x))
    return part


@jit
def _dequant_gemm_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, sorted_ptr,
    M, N, K, K_PAD, GRID_M, GRID_N, sxm, sxk, som, son, swe, swn, sse, ssn, sze, szn,
    only_expert,
    FMT: tl.constexpr, TILES: tl.constexpr, GROUP: tl.constexpr, SCALE_AFTER: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr, ONLY: tl.constexpr,
    FLOAT_CODES: tl.constexpr, W_LEFT: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr,
    GATE: tl.constexpr,
):
    """Prefill GEMM (M > 16): ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tensor-core tiles, the weight tile
    dequantized in registers. int4 nibbles are interleaved back to k order with ``join``; with one group per K tile
    (``SCALE_AFTER``) the exact integer codes minus the zero point go through the dot and the group scale multiplies
    the partial product, otherwise each weight is scaled before the dot. Programs are swizzled in groups of
    ``SWIZZLE`` row tiles so that neighbouring programs share weight tiles in L2. int4 plane words: the codes
    unpacked as floats where ``FLOAT_CODES`` (:func:`plane_codes`), or two at a time where ``PAIRS``
    (:func:`plane_code_pairs`; 2: scaled, the products then go straight into the accumulator); ``W_LEFT``: the
    transposed product ``W x^T`` (the dequantized tile the left operand, read by the tensor cores from registers),
    transposed back once at the end. ``GATE`` (an activation id, or -1): the gated fc1 of an MoE, N = 2F weight
    rows (gate rows, then up rows) giving F output columns ``act(gate) * up``: a tile's first BLOCK_N / 2 weight rows
    are the gate rows of its BLOCK_N / 2 output columns, the rest their up rows, which the epilogue pairs up
    (:func:`gated_epilogue`). (Alternating gate and up rows instead made ptxas reuse one operand register set for
    both of the K step's wgmma, each then waiting for the other: sm_90, Triton 3.6.)"""
    pid_m, pid_n = swizzled_program(tl.program_id(0), GRID_M, GRID_N, SWIZZLE)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    if TILES:
        expert = tl.load(tile_e_ptr + pid_m)
        lo = tl.load(tile_lo_ptr + pid_m)
        hi = tl.load(tile_hi_ptr + pid_m)
        if ONLY:  # one expert's tiles, its weight the only matrix given; the other tiles are empty
            hi = tl.where(expert == only_expert, hi, lo)
            expert = expert * 0
        row_ok = lo + rm < hi
        rows = tl.load(sorted_ptr + lo + rm, mask=row_ok, other=0)
    else:
        rows = pid_m * BLOCK_M + rm
        row_ok = rows < M
        expert = pid_m * 0
    e64 = expert.to(tl.int64)
    n, n_ok = weight_rows(pid_n, N, BLOCK_N, GATE)
    t_lo, t_hi = split_k_range(pid_k, tl.cdiv(K_PAD, BLOCK_K), SPLIT_K)
    k_lo, k_hi = t_lo * BLOCK_K, tl.minimum(t_hi * BLOCK_K, K_PAD)
    if TILES:  # an empty tile (the map's spare tiles, or another expert's under ONLY) runs no K loop: the map has
        #        cdiv(M, BLOCK_M) + E tiles, ~E / 2 of them spare (the last expert's weights, an empty row range)
        k_hi = tl.where(hi > lo, k_hi, k_lo)
    w_base = w_ptr + e64 * swe
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # W_LEFT's accumulator
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if FMT == 3:
            # int4 plane words: this K tile (128) is 16 words per row, nibble i of word w holds k = k0 + 16 i + w,
            # so each nibble position meets 16 contiguous inputs: 8 dots of K = 16, no shuffle of codes or inputs.
            # The group (a multiple of 128) holds the whole tile: exact codes minus the zero point go through the
            # dots and the group scale multiplies their sum. (One dot per 2, 4 or 8 positions, K = 32..128, was
            # slower on the H200: benchmarks/results.md, session 17.) W_LEFT: the transposed products.
            words, zero, scale = plane_tile(w_base, s_ptr, z_ptr, e64, n, n_ok, k0, swn, sse, ssn, sze, szn, GROUP)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            part_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for i in tl.static_range(8):
                ki = k0 + 16 * i + tl.arange(0, 16)
                xi = tl.load(x_ptr + rows[:, None] * sxm + ki[None, :] * sxk,
                             mask=row_ok[:, None] & (ki < K)[None, :], other=0.0)
                codes = plane_position_codes(words, zero, scale, i, PAIRS, FLOAT_CODES, ASM, FP16)
                if PAIRS == 2:  # scaled codes: no partial sum per tile, one accumulator
                    if W_LEFT:
                        acc_t += weight_times_rows(codes, xi, IEEE)
                    else:
                        acc += _rows_times_tile(xi, codes, IEEE)
                elif W_LEFT:
                    part_t += weight_times_rows(codes, xi, IEEE)
                else:
                    part += _rows_times_tile(xi, codes, IEEE)
            if PAIRS != 2:
                if W_LEFT:
                    acc_t += part_t * scale[:, None]
                else:
                    acc += part * scale[None, :]
        elif FMT == 2:
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
        if FMT != 3:
            x = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk, mask=row_ok[:, None] & (kk < K)[None, :],
                        other=0.0)
            part = _rows_times_tile(x, w, IEEE)
            if FMT == 2 and SCALE_AFTER:
                acc += part * scale[None, :]
            else:
                acc += part
    if FMT == 3 and W_LEFT:
        acc = tl.trans(acc_t)
    if GATE >= 0:
        gated_epilogue(acc, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows, row_ok, n, n_ok, e64, pid_n, N // 2, som, son,
                       sse, ssn, FMT, HAS_BIAS, HAS_RSCALE, GATE, BLOCK_N)
    else:
        matmul_epilogue(acc, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows, row_ok, n, n_ok, e64, pid_k, som, son, sse,
                        ssn, FMT, HAS_BIAS, HAS_RSCALE, ATOMIC)


def dequant_gemm(x, weight: PackedWeight, out, bias, row_scale, tiles: ExpertTiles | None, config, atomic: bool,
                 only_expert: int | None = None, plane_float_codes: bool = False, plane_weight_left: bool = False,
                 atomic_sem: str = "relaxed", plane_code_pairs: str = "", gate: str | None = None):
    """``out [M, N] <- x [M, K] @ W^T`` (+ ``bias``, * ``row_scale``): one matrix in row tiles of ``config.block_m``
    (swizzled in groups of 8 row tiles for L2 reuse), or with ``tiles`` the routed expert tiles (``config.block_m``
    must be ``tiles.block_m``). ``atomic``: split-K into a zeroed float32 ``out``. ``only_expert`` (with
    ``tiles``): only that expert's rows are computed and written, with ``weight`` a single matrix (its weight).
    ``plane_float_codes`` / ``plane_weight_left``: int4 plane codes unpacked as floats / the product taken as ``W x^T``
    (:class:`qmamba.kernels.matmul_configs.MatmulPolicy`); ``atomic_sem``: the split-K adds' ordering
    (``MatmulPolicy.split_k_atomic_sem``); ``plane_code_pairs``: ``MatmulPolicy.plane_gemm_code_pairs``.
    ``gate`` (an activation of :data:`ACTIVATION_IDS`): ``W`` is a gated fc1 (2F rows: gate, then up) and ``out [M,
    F]`` receives ``act(x W_gate^T) * (x W_up^T)`` (times ``row_scale``); no split-K."""
    if gate is not None and (atomic or config.split_k != 1 or weight.n % 2 or config.block_n % 2):
        raise ValueError("dequant gemm: a gated epilogue needs an even N and block_n, and no split-K")
    m = x.shape[0]
    q = weight.qweight
    s = weight.scales if weight.scales is not None else q
    z = weight.zeros if weight.zeros is not None else q
    dummy = x
    grid_m = tiles.n_tiles if tiles is not None else cdiv(m, config.block_m)
    grid_n = cdiv(weight.n // 2, config.block_n // 2) if gate is not None else cdiv(weight.n, config.block_n)
    _dequant_gemm_kernel[(grid_m * grid_n, config.split_k)](
        x, out, q, s, z, bias if bias is not None else dummy, row_scale if row_scale is not None else dummy,
        *(tiles.tensors() if tiles is not None else (dummy, dummy, dummy, dummy)),
        m, weight.n, weight.k, weight.k_padded, grid_m, grid_n, x.stride(0), x.stride(1), out.stride(0),
        out.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1), z.stride(0), z.stride(1),
        -1 if only_expert is None else only_expert,
        FMT=weight.fmt, TILES=tiles is not None, GROUP=max(weight.group_size, 1),
        SCALE_AFTER=weight.fmt == FMT_INT4 and weight.group_size % config.block_k == 0, SPLIT_K=config.split_k,
        HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None, ATOMIC=split_k_mode(atomic, atomic_sem),
        IEEE=x.dtype == torch.float32, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SWIZZLE=1 if tiles is not None else 8, ONLY=only_expert is not None,
        FLOAT_CODES=plane_float_codes and x.dtype != torch.float32, W_LEFT=plane_weight_left,
        **plane_pairs_args(plane_code_pairs, weight, x), GATE=-1 if gate is None else ACTIVATION_IDS[gate],
        num_warps=config.num_warps, num_stages=config.num_stages)
