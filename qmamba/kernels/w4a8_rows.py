"""W4A8 for a few rows (batched decode): int4 plane words times int8 activations with ``dp4a``, a program a row.

The batched decode step's experts (fc1 and fc2 of a model with int8 activations, ``DecodePolicy.int8_rows`` and
``int8_rows_fc2``, on CUDA since sessions 46 and 48), where each routed expert row program of the decode kernels
unpacks its expert's int4 codes to floats (fc1 at batch 8 is bound by instruction issue: ~4.8 SASS instructions a code,
benchmarks/results.md, session 38). Here the activation row is quantized to int8 once
(:func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8`: a per-row scale, codes in plane-byte order, each 128-column
tile's code sum) and each 32-bit plane word of the weight meets its 8 activation codes in two ``dp4a``: the low
nibbles masked in place (one instruction), the high ones shifted and masked (two), each set of four bytes one
``dp4a.u32.s32`` against the four int8 codes they pair with. Five instructions for eight codes; the exact int32 sum
of a 128-column tile is scaled once per weight row by its group scale, and the zero point's share is ``zero *
sum(x codes of the tile)``. The K loop takes ``chunk`` tiles a step and loads every operand of the next step
(weight words, scales, zero points, input codes and sums) before this step's products, so a program waits on
``tiles / chunk`` dependent loads, not one a tile (session 48: fc2's 31 tiles at one a step were ~0.6 us each).

So ``out = x_hat @ W_hat^T`` exactly up to float32 accumulation, as :func:`qmamba.kernels.w4a8_gemm.w4a8_gemm`
(the same activation quantization, the same weight record: nothing is stored for this kernel); its reference twin
is :func:`qmamba.kernels.w4a8_gemm.w4a8_gemm_ref`.
"""

from __future__ import annotations

import torch

from qmamba.kernels._triton import cdiv, jit, next_pow2, pdl_launch, tl
from qmamba.kernels.activations import ACTIVATION_IDS, activate
from qmamba.kernels.dequant_gemm import weight_rows
from qmamba.kernels.input_planes import add_word_sums, store_x_planes
from qmamba.kernels.row_norm import RowAddNorm, add_norm_row, check_row_add_norm
from qmamba.kernels.w4a8_gemm import w4a8_operands
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.layout import INT4_TILE, check_word_sums, check_x_planes


@jit
def _dp4a_words(words, x_lo, x_hi, ASM: tl.constexpr):
    """``[BN, 16]`` int32: for each plane word (8 nibbles, one 128-column tile holds 16 words a weight row) the sum
    of its low nibbles times the four int8 codes packed in ``x_lo`` and of its high nibbles times those in ``x_hi``
    (``[1, 16]`` int32 words of the activation codes in plane-byte order). ``ASM`` (compiled CUDA): two ``dp4a``;
    elsewhere (the interpreter has no inline PTX) the same sums byte by byte."""
    if ASM:
        d = tl.inline_asm_elementwise(
            "{ .reg .b32 l, h; and.b32 l, $1, 0x0F0F0F0F; shr.b32 h, $1, 4; and.b32 h, h, 0x0F0F0F0F; "
            "dp4a.u32.s32 $0, l, $2, 0; dp4a.u32.s32 $0, h, $3, $0; }",
            "=r,r,r,r", [words, tl.broadcast_to(x_lo, words.shape), tl.broadcast_to(x_hi, words.shape)],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        d = tl.zeros(words.shape, dtype=tl.int32)
        for i in tl.static_range(4):
            lo = (words >> (8 * i)) & 0xF
            hi = (words >> (8 * i + 4)) & 0xF
            d += lo * ((x_lo << (24 - 8 * i)) >> 24) + hi * ((x_hi << (24 - 8 * i)) >> 24)  # sign-extended bytes
    return d


@jit
def _weight_chunk(w_rows, w_cols, s_rows, z_rows, n_ok, cc, c, TILES: tl.constexpr, GROUP: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Tiles ``c .. c + CHUNK - 1`` of the program's weight rows (none past the last tile: zeros): the plane words
    ``[BN, CHUNK, 16]``, the group scales ``[BN, CHUNK]`` and the bytes holding the zero points ``[BN, CHUNK]``."""
    t = c + cc
    t_ok = t < TILES
    blk = (t * 128) // GROUP
    ok = n_ok[:, None] & t_ok[None, :]
    words = tl.load(w_rows + (16 * c + w_cols), mask=ok[:, :, None], other=0)
    scale = tl.load(s_rows + blk[None, :], mask=ok, other=0.0)
    zb = tl.load(z_rows + (blk // 2)[None, :], mask=ok, other=0).to(tl.int32)
    return words, scale, zb


@jit
def _input_chunk(x_row, x_cols, xsum_row, cc, c, TILES: tl.constexpr, CHUNK: tl.constexpr):
    """Tiles ``c .. c + CHUNK - 1`` of the input row (none past the last tile: zeros): its code words paired with
    the low nibbles ``[CHUNK, 16]``, with the high ones ``[CHUNK, 16]``, and the tiles' code sums ``[CHUNK]``."""
    t_ok = (c + cc) < TILES
    x_lo = tl.load(x_row + (32 * c + x_cols), mask=t_ok[:, None], other=0)
    x_hi = tl.load(x_row + (32 * c + 16 + x_cols), mask=t_ok[:, None], other=0)
    xsum = tl.load(xsum_row + c + cc, mask=t_ok, other=0.0)
    return x_lo, x_hi, xsum


@jit
def _w4a8_rows_kernel(
    q_ptr, xs_ptr, xsum_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, rexp_ptr, opl_ptr, ows_ptr,
    cnt_ptr, res_ptr, nw_ptr, nb_ptr, xo_ptr,
    N, sqm, ssum, som, son, swe, swn, sse, ssn, sze, szn, sopl_m, sows_m, sres, sxo, eps,
    TILES: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr,
    ROUTED: tl.constexpr, ASM: tl.constexpr, GATE: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
    EXPERT_READY: tl.constexpr = True, OUT_PLANES: tl.constexpr = False, OPL_K: tl.constexpr = 1,
    OUT_WSUMS: tl.constexpr = False, CHUNK: tl.constexpr = 1, OUT_NORM: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 128, LAYERNORM: tl.constexpr = False,
):
    """Program (row m, block of weight rows): ``out[m, n] = (sum over tiles of scale * (dot - zero * xsum)) *
    xscale[m]`` (+ bias, ``GATE``: ``act(gate) * up`` of the block's gate rows then up rows as the W4A8 GEMM's,
    times ``row_scale[m]``). ``ROUTED``: row m reads expert ``row_expert[m]``'s matrix. ``PDL``: the first tile's
    weight words are read before the wait for the kernel before (which wrote the codes), and so is the expert index
    where it was written earlier than that (``EXPERT_READY``; else it and the words are read after the wait: the
    fused step's fc1, whose router runs in the add + norm just before it). ``OUT_PLANES`` / ``OUT_WSUMS``: the
    stored output's int4 input planes 0..7 (``OPL_K`` columns a plane) and its word sums, the input of a plane-word
    GEMV after it (the fused step's fc2), as the decode kernels' epilogue writes them. ``OUT_NORM``: the last
    program of row m to finish (a counter a row, back to 0 after) ends the row with the add + norm after it
    (:func:`qmamba.kernels.row_norm.add_norm_row`, reading the stored row from L2: ``residual += out``, ``x_out =
    norm(residual)``), the fused step's add + norm after an MoE layer, in place of its launch."""
    m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    n, n_ok = weight_rows(pid_n, N, BLOCK_N, GATE)
    w16 = tl.arange(0, 16)
    cc = tl.arange(0, CHUNK)
    if PDL and not EXPERT_READY:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if ROUTED:
        e = tl.load(rexp_ptr + m).to(tl.int64)
    else:
        e = m * 0
    # a step of the K loop takes CHUNK tiles; every operand of the next step is loaded before this one's products
    w_rows = w_ptr + e * swe + n[:, None, None] * swn
    w_cols = cc[None, :, None] * 16 + w16[None, None, :]  # [1, CHUNK, 16]: the chunk's words of a weight row
    s_rows = s_ptr + e * sse + n[:, None] * ssn
    z_rows = z_ptr + e * sze + n[:, None] * szn
    words, scale, zb = _weight_chunk(w_rows, w_cols, s_rows, z_rows, n_ok, cc, 0, TILES, GROUP, CHUNK)
    if PDL and EXPERT_READY:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x_row = q_ptr + m * sqm  # the row's codes as int32 words: tile t's low-nibble codes at 32 t, high at 32 t + 16
    x_cols = cc[:, None] * 32 + w16[None, :]  # [CHUNK, 16]
    xsum_row = xsum_ptr + m * ssum
    x_lo, x_hi, xsum = _input_chunk(x_row, x_cols, xsum_row, cc, 0, TILES, CHUNK)
    acc = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    for c in range(0, TILES, CHUNK):  # c: the chunk's first tile
        t = c + cc
        blk = (t * 128) // GROUP  # (a tile is 128 columns)
        zero = ((zb >> ((blk % 2) * 4)[None, :]) & 0xF).to(tl.float32)
        part = tl.sum(_dp4a_words(words, x_lo[None, :, :], x_hi[None, :, :], ASM), axis=2)
        s_c = scale.to(tl.float32)
        xs_c = xsum
        # the next chunk (nothing past the last tile), loaded while this one is scaled
        words, scale, zb = _weight_chunk(w_rows, w_cols, s_rows, z_rows, n_ok, cc, c + CHUNK, TILES, GROUP, CHUNK)
        x_lo, x_hi, xsum = _input_chunk(x_row, x_cols, xsum_row, cc, c + CHUNK, TILES, CHUNK)
        acc += s_c * (part.to(tl.float32) - zero * xs_c[None, :])
    acc = tl.sum(acc, axis=1)
    acc *= tl.load(xs_ptr + m)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if GATE >= 0:
        gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N // 2)), (1, 0)))
        acc = activate(gate, GATE) * up
        n = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        n_ok = n < N // 2
    if HAS_RSCALE:
        acc *= tl.load(rscale_ptr + m).to(tl.float32)
    yq = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m * som + n * son, yq, mask=n_ok)
    if OUT_PLANES:  # the planes of the stored value, as the decode kernels' epilogue writes them
        store_x_planes(opl_ptr + m * sopl_m, n, yq.to(tl.float32), n_ok, OPL_K)
    if OUT_WSUMS:
        add_word_sums(ows_ptr + m * sows_m, n, yq.to(tl.float32), n_ok)
    if OUT_NORM:  # every thread's stores, then one release of them with the count; the last program of the row
        tl.debug_barrier()  # reads them all
        done = tl.atomic_add(cnt_ptr + m, 1, sem="acq_rel")
        if done == tl.num_programs(1) - 1:
            add_norm_row(out_ptr + m * som, son, res_ptr + m * sres, nw_ptr, nb_ptr, xo_ptr + m * sxo,
                         N // 2 if GATE >= 0 else N, eps, NORM_BLOCK, LAYERNORM, True)
            tl.store(cnt_ptr + m, 0)  # ready for the next call


def w4a8_rows(codes, scale, sums, weight: PackedWeight, out=None, bias=None, row_expert=None, row_scale=None,
              gate: str | None = None, block_n: int = 32, num_warps: int = 4, pdl: bool = False,
              expert_ready: bool = True, out_planes=None, out_word_sums=None, chunk: int = 1,
              out_norm: RowAddNorm | None = None) -> torch.Tensor:
    """``out [M, N] <- (x_hat @ W_hat^T + bias) * row_scale`` (row m on expert ``row_expert[m]`` of a stack) from
    :func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8`'s ``codes, scale, sums`` and int4 plane words (group size a
    multiple of 128), a program a row and ``block_n`` weight rows. ``gate`` (an activation of
    :data:`ACTIVATION_IDS`): a gated fc1 (2F rows: gate, then up), ``out [M, F]`` receives ``act(gate) * up``.
    ``pdl`` (Hopper and newer, inside a CUDA graph): a programmatic dependent launch; ``expert_ready``: with it,
    ``row_expert`` was written before the kernel just before this one, so it is read before the wait (False: the
    router is that kernel). ``out_planes [M, 9, width]`` fp32: planes 0..7 receive the int4 input planes of ``out``
    as stored (:func:`qmamba.quant.layout.int4_x_planes`), and ``out_word_sums [M, width / 8]`` fp32 (zeroed
    before) their word sums, as :func:`qmamba.kernels.decode_linear.decode_linear` writes them. ``chunk`` (a power of
    two): 128-column tiles a step of the K loop takes, every operand of the next step loaded before this one's
    products (a chain of ``tiles / chunk`` dependent loads a program). ``out_norm`` (a
    :class:`qmamba.kernels.row_norm.RowAddNorm`): the last program of each row to finish also adds the stored row into
    the residual and writes its norm (``add_norm``'s without router, planes or int8 codes); its ``counter`` is int32
    ``[M]``, zeros before the first call, left at zeros after each. ``out`` defaults to a new bfloat16 tensor."""
    out = w4a8_operands("w4a8_rows", codes, sums, weight, out, gate, block_n)
    if weight.n_experts != 1 and row_expert is None:
        raise ValueError("w4a8_rows: an expert stack needs row_expert")
    opl_k = check_x_planes("w4a8_rows", "out_planes", out_planes, out.shape[0], out.shape[1]) \
        if out_planes is not None else 1
    if out_word_sums is not None:
        if out_planes is None:
            raise ValueError("w4a8_rows: word sums of the output need its planes (out_planes)")
        check_word_sums("w4a8_rows", "out_word_sums", out_word_sums, out.shape[0], opl_k)
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"w4a8_rows: chunk must be a power of two, got {chunk}")
    m, k_pad = codes.shape
    n_out = out.shape[1]
    if out_norm is not None:
        check_row_add_norm("w4a8_rows", out_norm, m, n_out)
    if m == 0:
        return out
    words = codes.view(torch.int32)
    q, s, z = weight.qweight, weight.scales, weight.zeros
    grid_n = cdiv(n_out, block_n // 2) if gate is not None else cdiv(weight.n, block_n)
    dummy = scale
    _w4a8_rows_kernel[(m, grid_n)](
        words, scale, sums, out, q, s, z, bias if bias is not None else dummy,
        row_scale if row_scale is not None else dummy, row_expert if row_expert is not None else dummy,
        out_planes if out_planes is not None else dummy, out_word_sums if out_word_sums is not None else dummy,
        *((out_norm.counter, out_norm.residual, out_norm.norm_w,
           out_norm.norm_b if out_norm.norm_b is not None else out_norm.norm_w, out_norm.x_out)
          if out_norm is not None else (dummy,) * 5),
        weight.n, words.stride(0), sums.stride(0), out.stride(0), out.stride(1), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1), z.stride(0), z.stride(1), out_planes.stride(0) if out_planes is not None else 0,
        out_word_sums.stride(0) if out_word_sums is not None else 0,
        out_norm.residual.stride(0) if out_norm is not None else 0, out_norm.x_out.stride(0) if out_norm is not None
        else 0, float(out_norm.eps) if out_norm is not None else 0.0,
        TILES=k_pad // INT4_TILE, GROUP=weight.group_size, HAS_BIAS=bias is not None,
        HAS_RSCALE=row_scale is not None, ROUTED=row_expert is not None, ASM=codes.is_cuda,
        GATE=-1 if gate is None else ACTIVATION_IDS[gate], PDL=pdl, BLOCK_N=block_n,
        EXPERT_READY=expert_ready, OUT_PLANES=out_planes is not None, OPL_K=opl_k,
        OUT_WSUMS=out_word_sums is not None, CHUNK=chunk, OUT_NORM=out_norm is not None,
        NORM_BLOCK=next_pow2(n_out) if out_norm is not None else 128,
        LAYERNORM=out_norm is not None and out_norm.norm_b is not None,
        num_warps=num_warps, **pdl_launch(pdl))
    return out
