"""Decode-step linear layers ``out = f(x) @ W_hat^T`` for a few rows (M <= 8), latency first, in Triton.

A decode token of BlackMamba-2.8B is ~150 small dependent kernels, each moving 1-6 MB: its time is launch and
dependency latency, not bytes (benchmarks/results.md, "Decode"). These kernels are built for that:

* **whole rows per program, no split-K**: a program owns ``BLOCK_N`` output rows over all of K, so there are no
  atomics, no zeroed workspace and each output is written once;
* **weights before the wait** (programmatic dependent launch, ``PDL``): a program loads its whole weight tile (and
  scales) into registers, *then* waits for the previous kernel (``gdc_wait``), then reads its input. Inside a CUDA
  graph the next kernel is launched while the previous one runs, so its weight loads overlap the previous kernel's
  tail. Only weights (constant during a step) are read before the wait; expert weights, whose choice comes from
  the previous kernel, are read after it. Each kernel lets its own dependents launch right after its wait;
* **fused epilogues** that remove whole kernels: the causal-conv step after ``in_proj``
  (``conv_out``: each program computes ``silu(conv(state, x) + b)`` for its own x rows from the old conv state and
  writes it beside them, so x_proj reads a finished input; the dt kernel, which runs after every reader, writes the
  new state), the gated activation after ``fc1`` (``gated``: a program computes gate rows ``n`` and up rows
  ``F + n`` of its expert and writes ``act(gate) * up``). (The conv step in front of x_proj instead, recomputed by
  every program, took 27 us for an int4 x_proj on the H200 against 4 us after the epilogue.)

Formats: float (any dtype), int8 (per-row scale), int4 in the stored group-wise layout read as 32-bit words,
int4 "planes" (:func:`qmamba.quant.layout.int4_to_planes`: the same codes arranged so that each nibble position of
a tile's words covers consecutive k, whose input is one contiguous read; ``code | 0x4B000000`` is the float
``2^23 + code``, so one subtraction gives ``code - zero`` exactly), and 1-bit signs (:class:`BinaryWeight` without a
row scale, K a multiple of 32: bit t of word j is the sign of k = 32 j + t; ``x @ W_hat^T = (x * alpha) @ S^T +
x . beta``: the sign words are loaded before the wait, the per-column alpha and beta with the input after it; with
the "denorm" reading each bit is masked in place and read as a subnormal float against ``alpha_denorm``, see
:func:`qmamba.quant.layout.binary_denorm_vectors` and :func:`binary_denorm_of`).
Routing: ``row_expert [M]`` (top-1 MoE) picks each row's expert; program column ``e`` serves the rows routed to
expert ``e`` and reads only that expert's weights (an idle column reads nothing), or (``routed_row_programs``)
program row ``m`` serves input row ``m`` on its own expert's tile.
Input planes (``x_planes``, :data:`qmamba.quant.layout.INT4_X_PLANES`): plane words may read their input prepared
by its producer, scaled per nibble position, so that a code costs a mask, a load and an FMA (``int4_x_planes``).

The pure-PyTorch twin is :func:`decode_linear_ref`. The launch choices (PDL on or off, tile widths, which fusions)
are a :class:`qmamba.kernels.decode_policy.DecodePolicy`, an explicit argument, never module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.kernels._triton import jit, next_pow2, pdl_launch, tl
from qmamba.kernels.activations import ACTIVATION_IDS, activate
from qmamba.kernels.decode_policy import INT4_UNPACK, MAX_ROWS, DecodePolicy, binary_words
from qmamba.kernels.fused_moe import gated_act_ref
from qmamba.kernels.input_planes import add_word_sums, store_x_planes, x_plane_scale
from qmamba.kernels.weights import FMT_INT4, FMT_INT4_PLANES, BinaryWeight, PackedWeight, int32_words
from qmamba.quant.layout import INT4_TILE, INT4_TILE_WORDS, binary_denorm_vectors, check_word_sums, check_x_planes

MMA_ROWS = 16  # rows and weight rows of a tensor-core tile (plane words, 2+ input rows)
UNPACK_DENORM_X_IN_TILE = 3  # "denorm" with the input read in the tile's shape (DecodePolicy.int4_x_in_tile)
_FLOAT_2P23_BITS = 0x4B000000  # the bits of the float 2^23, passed at run time (see _int4_codes)


def tile_pieces(tiles: int) -> tuple[int, int]:
    """``(NBP, NBP2)``: a row of ``tiles`` int4 tiles as a power-of-two piece and a second, smaller one after it
    (``NBP2`` 0: one piece, ``next_pow2(tiles)``), where two pieces cover fewer padding tiles than one."""
    whole = next_pow2(tiles)
    first = whole if whole == tiles else whole // 2
    second = next_pow2(tiles - first) if tiles > first else 0
    return (first, second) if second and first + second < whole else (whole, 0)


# ---- kernel --------------------------------------------------------------------------------------------------------
# int4 tiles: ``words [BN, NBP, WPG]`` int32, one row of ``NBP`` (padded to a power of two) tiles of ``WPG`` words.
# "words" (FMT 2, the stored layout read as int32): a tile is one quantization group, nibble i of word w holds
# k = 8 (WPG t + w) + i. "planes" (FMT 3, layout.int4_to_planes): a tile is 128 elements in 16 words, nibble i of
# word w holds k = 128 t + 16 i + w, and the tile's scale block is t // TPB.
@jit
def _load_tile(w_ptr, s_ptr, z_ptr, e64, rows, rows_ok, K, swe, swn, sse, ssn, sze, szn,
               FMT: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, TPB: tl.constexpr,
               T0: tl.constexpr):
    """The weight rows ``rows`` of expert ``e64`` as stored, into registers: ``(words [BN, NBP, WPG] int32, scale
    [BN, NBP] fp32, zero point [BN, NBP] fp32)`` of tiles ``T0 .. T0 + NBP - 1`` for int4, ``(w [BN, KP], row scale
    [BN] fp32, unused)`` otherwise.
    Masked (no memory read) where ``rows_ok`` is false. Binary (FMT 4): ``(sign words [BN, KP] int32, pointer to
    the expert's alpha [K], pointer to its beta [K])``: alpha and beta are read with the input, per bit position."""
    if FMT == 4:
        j = tl.arange(0, KP)
        wm = rows_ok[:, None] & (j < K // 32)[None, :]
        w = tl.load(w_ptr + e64 * swe + rows[:, None] * swn + j[None, :], mask=wm, other=0)
        scale = s_ptr + e64 * sse
        zero = z_ptr + e64 * sze
    elif FMT == 2 or FMT == 3:
        t = T0 + tl.arange(0, NBP)
        j = tl.arange(0, WPG)
        n_tiles = (K + WPG * 8 - 1) // (WPG * 8)
        tm = (t < n_tiles)[None, :] & rows_ok[:, None]
        w = tl.load(w_ptr + e64 * swe + rows[:, None, None] * swn + (t * WPG)[None, :, None] + j[None, None, :],
                    mask=tm[:, :, None], other=0)
        b = t // TPB
        scale = tl.load(s_ptr + e64 * sse + rows[:, None] * ssn + b[None, :], mask=tm, other=0.0).to(tl.float32)
        zb = tl.load(z_ptr + e64 * sze + rows[:, None] * szn + (b // 2)[None, :], mask=tm, other=0).to(tl.int32)
        zero = ((zb >> ((b % 2) * 4)[None, :]) & 0xF).to(tl.float32)
    else:
        k = tl.arange(0, KP)
        wm = rows_ok[:, None] & (k < K)[None, :]
        w = tl.load(w_ptr + e64 * swe + rows[:, None] * swn + k[None, :], mask=wm, other=0.0)
        if FMT == 1:
            scale = tl.load(s_ptr + e64 * sse + rows * ssn, mask=rows_ok, other=0.0).to(tl.float32)
        else:
            scale = tl.full((w.shape[0],), 1.0, tl.float32)
        zero = scale
    return w, scale, zero


@jit
def _int4_k(i: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, FMT: tl.constexpr):
    """``[NBP, WPG]``: the k that nibble ``i`` of each word of the tile row holds (see above)."""
    t = tl.arange(0, NBP)[:, None]
    w = tl.arange(0, WPG)[None, :]
    if FMT == 3:
        return t * 128 + 16 * i + w
    return (t * WPG + w) * 8 + i


@jit
def _int4_codes(w, hi, zero, exp_bits, i: tl.constexpr, UNPACK: tl.constexpr):
    """``(code - zero) * 16^p`` of nibble ``i`` of every word, exactly, as fp32 (``p = 0`` unless ``UNPACK >= 1``);
    the caller multiplies the input by ``16^-p``. A code OR'ed into the mantissa of 2^23 is the float 2^23 + code, so
    one subtraction of 2^23 + zero gives the difference. ``UNPACK`` 1 ("magic"; 2 where this helper serves): no shift
    per nibble; nibbles 0..4 are masked in place
    (2^23 + code 16^i, exact below 2^23) and 5..7 likewise from ``hi = w >> 20``. ``exp_bits`` is 2^23's bits
    (0x4B000000) as a run-time value: the mask and the OR then fold into one three-input logic instruction per code
    (with both as immediates the compiler emits two)."""
    if UNPACK >= 1:
        if i < 5:
            bits = w & (0xF << (4 * i))
            scaled = zero * (16.0 ** i) + 8388608.0
        else:
            bits = hi & (0xF << (4 * (i - 5)))
            scaled = zero * (16.0 ** (i - 5)) + 8388608.0
    else:
        bits = (w >> (4 * i)) & 0xF
        scaled = zero + 8388608.0
    return (bits | exp_bits).to(tl.float32, bitcast=True) - scaled[:, :, None]


@jit
def _int4_x_scale(i: tl.constexpr, UNPACK: tl.constexpr):
    if UNPACK >= 1:
        if i < 5:
            return 1.0 / (16.0 ** i)
        return 1.0 / (16.0 ** (i - 5))
    return 1.0


@jit
def _int4_subnormal(w, hi, xi, i: tl.constexpr):
    """``(code * 2^(4p - 149), x * 2^(96 - 4p))`` of nibble ``i`` of every word (p its position in ``w``, or in
    ``hi = w >> 20`` for nibbles 5..7): a nibble masked in place and read as a float is that subnormal, exactly, and
    the product of the two is ``code * x * 2^-53`` for every position (a few bits times bf16 / fp32 bits: exact).
    Needs subnormals kept (no flush to zero: Triton's fp32 default) and |x| < 2^32."""
    return _subnormal_codes(w, hi, i), xi * x_plane_scale(i)


@jit
def _subnormal_codes(w, hi, i: tl.constexpr):
    """``code * 2^(4p - 149)`` of nibble ``i`` of every word: masked in place (p = i, or i - 5 in ``hi = w >> 20``)
    and read as a float (see :func:`_int4_subnormal`)."""
    if i < 5:
        codes = (w & (0xF << (4 * i))).to(tl.float32, bitcast=True)
    else:
        codes = (hi & (0xF << (4 * (i - 5)))).to(tl.float32, bitcast=True)
    return codes


@jit
def _input_at(x_ptr, r, sxm, k, km):
    """Input row ``r`` at positions ``k`` (any shape; ``km`` its mask) in fp32."""
    return tl.load(x_ptr + r * sxm + k, mask=km, other=0.0).to(tl.float32)


@jit
def _dot_row_binary(w, w_up, alpha_dn, gamma, x_ptr, r, sxm, k_lim, KP: tl.constexpr, UP: tl.constexpr):
    """``([BN], [BN])`` fp32: a 1-bit tile (and, ``UP``, the up rows ``w_up`` of a gated stack, which share its
    columns) times input row ``r``, the "denorm" reading (``alpha_dn`` / ``gamma``: pointers to the expert's
    alpha_denorm / gamma, :func:`qmamba.quant.layout.binary_denorm_vectors`): bit t of each word masked in place (bits
    16..31 from the word shifted down by 16) and read as a float times ``x * alpha_denorm``, a mask and an FMA per
    weight; x and alpha_denorm read in the tile's shape 4 bits at a time, once for all the program's rows (and both
    halves of a gated stack), x . gamma once."""
    j = tl.arange(0, KP)
    c4 = tl.arange(0, 4)
    wh = (w >> 16) & 0xFFFF
    part = tl.zeros((w.shape[0], KP, 4), dtype=tl.float32)
    if UP:
        wh_up = (w_up >> 16) & 0xFFFF
        part_up = tl.zeros((w.shape[0], KP, 4), dtype=tl.float32)
    for c in tl.static_range(8):
        k3 = ((j * 32)[:, None] + (c * 4 + c4)[None, :])[None, :, :]                                    # [1, KP, 4]
        km = k3 < k_lim
        u = _input_at(x_ptr, r, sxm, k3, km) * tl.load(alpha_dn + k3, mask=km, other=0.0)
        bit = (1 << ((c % 4) * 4 + c4))[None, None, :]
        if c < 4:
            part += (w[:, :, None] & bit).to(tl.float32, bitcast=True) * u
            if UP:
                part_up += (w_up[:, :, None] & bit).to(tl.float32, bitcast=True) * u
        else:
            part += (wh[:, :, None] & bit).to(tl.float32, bitcast=True) * u
            if UP:
                part_up += (wh_up[:, :, None] & bit).to(tl.float32, bitcast=True) * u
    kk = tl.arange(0, KP * 32)
    xg = tl.sum(_input_at(x_ptr, r, sxm, kk, kk < k_lim) * tl.load(gamma + kk, mask=kk < k_lim, other=0.0), axis=0)
    y = tl.sum(tl.sum(part, axis=2), axis=1) * (2.0 ** 54) + xg  # 2^54: layout.BINARY_DENORM_SUM_SCALE
    if UP:
        y_up = tl.sum(tl.sum(part_up, axis=2), axis=1) * (2.0 ** 54) + xg
    else:
        y_up = y
    return y, y_up


@jit
def _dot_row(w, scale, zero, x_ptr, r, sxm, K, row_ok, exp_bits,
             FMT: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, UNPACK: tl.constexpr):
    """``[BN]`` fp32: the tile times input row ``r``. int4: per nibble position, ``(code - zero) * x`` summed over
    the tile row, times the tile's scale. A row that is not ``row_ok`` reads nothing (its K limit is 0)."""
    k_lim = tl.where(row_ok, K, 0)  # scalar masks fold into limits: the interpreter rejects vector & scalar masks
    if FMT == 4 and UNPACK >= 2:
        y = _dot_row_binary(w, w, scale, zero, x_ptr, r, sxm, k_lim, KP, False)[0]
    elif FMT == 4:
        # 1-bit (scale / zero: pointers to the expert's alpha / beta): per bit position t, the input's k = 32 j + t
        # times alpha, its sign bit flipped where the weight's bit is 0 (s = -1): a shift, one three-input logic
        # instruction and an add per weight; x . beta on the side, once per k.
        j = tl.arange(0, KP)
        nw = ~w
        part = tl.zeros(w.shape, dtype=tl.float32)
        xb = tl.zeros((KP,), dtype=tl.float32)
        for t in tl.static_range(32):
            k = j * 32 + t
            km = k < k_lim
            xt = _input_at(x_ptr, r, sxm, k, km)
            xa = (xt * tl.load(scale + k, mask=km, other=0.0).to(tl.float32)).to(tl.int32, bitcast=True)
            xb += xt * tl.load(zero + k, mask=km, other=0.0).to(tl.float32)
            flip = (nw << (31 - t)) & -2147483648                                            # 0x80000000 where s = -1
            part += (xa[None, :] ^ flip).to(tl.float32, bitcast=True)
        y = tl.sum(part, axis=1) + tl.sum(xb, axis=0)
    elif (FMT == 2 or FMT == 3) and UNPACK >= 2:
        # "denorm" (_int4_subnormal): a mask and an FMA per code, all positions in the scale 2^-53. The zero point
        # comes off once per word (zero * sum of the word's inputs); the tile scale carries the 2^53 back.
        # UNPACK 3: the input of the codes read in the tile's shape (no broadcast over the rows), its word sums
        # from a second, [tiles, words] read.
        hi = w >> 20
        part = tl.zeros(w.shape, dtype=tl.float32)
        xs = tl.zeros((w.shape[1], w.shape[2]), dtype=tl.float32)
        row0 = tl.zeros((w.shape[0], 1, 1), dtype=tl.int32)
        for i in tl.static_range(8):
            k = _int4_k(i, NBP, WPG, FMT)
            xi = _input_at(x_ptr, r, sxm, k, k < k_lim)
            xs += xi
            if UNPACK == 3:
                k3 = k[None, :, :] + row0
                codes, xp = _int4_subnormal(w, hi, _input_at(x_ptr, r, sxm, k3, k3 < k_lim), i)
                part += codes * xp
            else:
                codes, xp = _int4_subnormal(w, hi, xi, i)
                part += codes * xp[None, :, :]
        part -= zero[:, :, None] * (xs * (2.0 ** -53))[None, :, :]
        y = tl.sum(tl.sum(part, axis=2) * (scale * (2.0 ** 53)), axis=1)
    elif FMT == 2 or FMT == 3:
        hi = w >> 20
        part = tl.zeros(w.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            k = _int4_k(i, NBP, WPG, FMT)
            xi = _input_at(x_ptr, r, sxm, k, k < k_lim)
            part += _int4_codes(w, hi, zero, exp_bits, i, UNPACK) * (xi * _int4_x_scale(i, UNPACK))[None, :, :]
        y = tl.sum(tl.sum(part, axis=2) * scale, axis=1)
    else:
        k = tl.arange(0, KP)
        x = _input_at(x_ptr, r, sxm, k, k < k_lim)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) * scale
    return y


@jit
def _plane_at(ptr, offs, lim, FULL: tl.constexpr):
    """An input plane at ``offs`` (any shape): unmasked where it covers them (``FULL``), else 0 from ``lim`` on."""
    if FULL:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < lim, other=0.0)
    return x


@jit
def _planes_parts(w, zero, w_up, zero_up, xr, xs_row, K, row_ok, NBP: tl.constexpr, WPG: tl.constexpr,
                  UNPACK: tl.constexpr, XPL_K: tl.constexpr, SUMS: tl.constexpr, T0: tl.constexpr, UP: tl.constexpr,
                  SUMS_IN_TILE: tl.constexpr):
    """``(part, part_up)`` ``[BN, NBP, WPG]`` fp32, not yet reduced: plane-word tiles ("denorm" codes, tiles ``T0 ..
    T0 + NBP - 1`` of the row; ``w_up`` too if ``UP``, from the same reads of the input, else ``part_up`` is
    ``part``) times one input row given as its prepared input planes ``xr`` (:data:`qmamba.quant.layout.
    INT4_X_PLANES`, ``XPL_K`` columns a plane): per code a mask, a read of its input already in the code's scale and
    an FMA; the zero point per word against the word sums of plane 8, in the scale 2^-53 (:func:`_planes_reduce`
    carries it back). The input is read in the tile's shape (``UNPACK`` 3, every thread that needs it, from L1) or
    once per nibble position and broadcast over the rows (2). ``SUMS``: the row at ``xs_row`` holds the word sums
    (plane 8, ``xr + 8 XPL_K``, or a row its producer added them into); else (a producer that writes planes 0..7
    only) they are summed here from the planes, once per word for all rows;
    ``SUMS_IN_TILE`` (with ``UNPACK`` 3): plane 8 read in the tile's shape too, by every thread that needs it (from
    L1), not once and broadcast over the rows through shared memory (a barrier)."""
    k_lim = tl.where(row_ok, K, 0)
    hi = w >> 20
    part = tl.zeros(w.shape, dtype=tl.float32)
    if UP:
        hi_up = w_up >> 20
        part_up = tl.zeros(w.shape, dtype=tl.float32)
    row0 = tl.zeros((w.shape[0], 1, 1), dtype=tl.int32)
    full: tl.constexpr = (T0 + NBP) * 128 <= XPL_K  # the planes cover the padded tiles: no masks (padding is 0)
    xsum = tl.zeros((NBP, WPG), dtype=tl.float32)
    for i in tl.static_range(8):
        k = _int4_k(i, NBP, WPG, 3) + T0 * 128
        if not SUMS:  # the word's input sum: x from each plane's 2^(96 - 4p) x
            xsum += _plane_at(xr + i * XPL_K, k, k_lim, full) / x_plane_scale(i)
        if UNPACK == 3:
            xp = _plane_at(xr + i * XPL_K, k[None, :, :] + row0, k_lim, full)
        else:
            xp = _plane_at(xr + i * XPL_K, k, k_lim, full)[None, :, :]
        part += _subnormal_codes(w, hi, i) * xp
        if UP:
            part_up += _subnormal_codes(w_up, hi_up, i) * xp
    words = (T0 + tl.arange(0, NBP))[:, None] * WPG + tl.arange(0, WPG)[None, :]
    if SUMS and UNPACK == 3 and SUMS_IN_TILE:
        xs = _plane_at(xs_row, words[None, :, :] + row0, k_lim, full)
    elif SUMS:
        xs = _plane_at(xs_row, words, k_lim, full)[None, :, :]
    else:
        xs = (xsum * (2.0 ** -53))[None, :, :]
    part -= zero[:, :, None] * xs
    if UP:
        part_up -= zero_up[:, :, None] * xs
    else:
        part_up = part
    return part, part_up


@jit
def _planes_reduce(part, scale):
    """``[BN]``: a :func:`_planes_parts` part summed over its tile row, each tile times its scale."""
    return tl.sum(tl.sum(part, axis=2) * (scale * (2.0 ** 53)), axis=1)


@jit
def _dot_row_planes(w, scale, zero, w2, scale2, zero2, xr, xs_row, K, row_ok, NBP: tl.constexpr,
                    NBP2: tl.constexpr, WPG: tl.constexpr, UNPACK: tl.constexpr, XPL_K: tl.constexpr,
                    SUMS: tl.constexpr):
    """``[BN]`` fp32: a plane-word tile row times one input row given as its input planes (:func:`_planes_parts`),
    piece by piece: ``w`` (``NBP`` tiles) reduced, then ``w2`` (the ``NBP2`` after them; none if 0)."""
    y = _planes_reduce(_planes_parts(w, zero, w, zero, xr, xs_row, K, row_ok, NBP, WPG, UNPACK, XPL_K, SUMS, 0,
                                     False, False)[0], scale)
    if NBP2 > 0:
        y += _planes_reduce(_planes_parts(w2, zero2, w2, zero2, xr, xs_row, K, row_ok, NBP2, WPG, UNPACK, XPL_K, SUMS,
                                          NBP, False, False)[0], scale2)
    return y


@jit
def _dot_rows_int4(w, scale, zero, x_ptr, rr, sxm, K, M, exp_bits,
                   FMT: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, UNPACK: tl.constexpr):
    """``[ROWS, BN]`` fp32: int4 tile times the input rows ``rr`` (rows >= M read nothing), each code unpacked once
    (``UNPACK`` 2 or 3: as subnormal floats, :func:`_int4_subnormal`; one mask per code for all rows)."""
    k_lim = tl.where(rr < M, K, 0)
    hi = w >> 20
    part = tl.zeros((rr.shape[0], w.shape[0], w.shape[1]), dtype=tl.float32)                      # [R, BN, NBP]
    if UNPACK >= 2:
        xs = tl.zeros((rr.shape[0], w.shape[1]), dtype=tl.float32)                                # [R, NBP]
        for i in tl.static_range(8):
            k = _int4_k(i, NBP, WPG, FMT)[None, :, :]
            xi = _input_at(x_ptr, rr[:, None, None], sxm, k, k < k_lim[:, None, None])            # [R, NBP, WPG]
            xs += tl.sum(xi, axis=2)
            codes, xp = _int4_subnormal(w, hi, xi, i)
            part += tl.sum(codes[None, :, :, :] * xp[:, None, :, :], axis=3)
        part -= zero[None, :, :] * (xs * (2.0 ** -53))[:, None, :]
        return tl.sum(part * (scale * (2.0 ** 53))[None, :, :], axis=2)
    for i in tl.static_range(8):
        k = _int4_k(i, NBP, WPG, FMT)[None, :, :]
        xi = _input_at(x_ptr, rr[:, None, None], sxm, k, k < k_lim[:, None, None]) * _int4_x_scale(i, UNPACK)
        wf = _int4_codes(w, hi, zero, exp_bits, i, UNPACK)                                       # [BN, NBP, WPG]
        part += tl.sum(wf[None, :, :, :] * xi[:, None, :, :], axis=3)
    return tl.sum(part * scale[None, :, :], axis=2)


@jit
def _dot_rows_mma(w, scale, zero, x_ptr, rr, rok, sxm, K, NBP: tl.constexpr):
    """``[R, BN]`` fp32: an int4 plane tile times the input rows ``rr`` where ``rok`` (R >= 16 and BN >= 16), on the
    tensor cores: per nibble position, the dequantized weights ``[BN, NBP * 16]`` times the inputs at the k they
    hold (for a tile row, 16 consecutive k per tile). Float32 inputs take the exact (IEEE) product; others round
    the dequantized weight to the input's type, as the general kernels' small-M tiles do."""
    bn: tl.constexpr = w.shape[0]
    nw: tl.constexpr = NBP * 16
    q = tl.arange(0, nw)
    acc = tl.zeros((bn, rr.shape[0]), dtype=tl.float32)
    for i in tl.static_range(8):
        a = tl.reshape((((w >> (4 * i)) & 0xF).to(tl.float32) - zero[:, :, None]) * scale[:, :, None], (bn, nw))
        k = (q // 16) * 128 + 16 * i + (q % 16)
        xi = _input_at(x_ptr, rr[None, :], sxm, k[:, None], (k < K)[:, None] & rok[None, :])        # [NW, R]
        if x_ptr.dtype.element_ty == tl.float32:
            acc += tl.dot(a, xi, input_precision="ieee")
        else:
            acc += tl.dot(a.to(x_ptr.dtype.element_ty), xi.to(x_ptr.dtype.element_ty))
    return tl.trans(acc)


@jit
def _load_weights(w_ptr, s_ptr, z_ptr, e64, rows, rows_ok, K, N_UP, swe, swn, sse, ssn, sze, szn,
                  FMT: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, TPB: tl.constexpr,
                  GATED: tl.constexpr, T0: tl.constexpr):
    """A program's weights (int4: tiles ``T0 .. T0 + NBP - 1``): ``(w, scale, zero)`` of its rows, then the same of
    the up rows ``rows + N_UP`` if ``GATED`` (else the first three again)."""
    w, scale, zero = _load_tile(w_ptr, s_ptr, z_ptr, e64, rows, rows_ok, K, swe, swn, sse, ssn, sze, szn,
                                FMT, KP, NBP, WPG, TPB, T0)
    if GATED:
        w_up, scale_up, zero_up = _load_tile(w_ptr, s_ptr, z_ptr, e64, rows + N_UP, rows_ok, K, swe, swn, sse, ssn,
                                             sze, szn, FMT, KP, NBP, WPG, TPB, T0)
    else:
        w_up, scale_up, zero_up = w, scale, zero
    return w, scale, zero, w_up, scale_up, zero_up


@jit
def _decode_linear_kernel(
    x_ptr, st_ptr, cw_ptr, cb_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rexp_ptr, rscale_ptr, out_ptr, co_ptr, xpl_ptr,
    opl_ptr, M, N, K, N_UP, DI, sxm, ss_m, ss_d, som, scom, swe, swn, sse, ssn, sze, szn, exp_bits, sxpl_m, sopl_m,
    nacc_ptr, nrb_ptr, n_width, n_eps, n_e, pres_ptr, pnw_ptr, pacc_ptr, prw_ptr, srw_e, pux_ptr, p_e,
    xws_ptr, ows_ptr, sxws_m, sows_m,
    NORM_IN: tl.constexpr, ROUTE_ACC: tl.constexpr, HAS_NRB: tl.constexpr, NORM_OUT: tl.constexpr,
    ROUTER_OUT: tl.constexpr, BLOCK_E: tl.constexpr, FMT: tl.constexpr, ROWS: tl.constexpr, ROUTED: tl.constexpr,
    CONV_W: tl.constexpr, HAS_CB: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RSCALE: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, TPB: tl.constexpr,
    UNPACK: tl.constexpr, CONV_EPI: tl.constexpr, MMA: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
    EXPERT_READY: tl.constexpr, ROW_PROGRAMS: tl.constexpr, X_PLANES: tl.constexpr, XPL_K: tl.constexpr,
    XPL_SUMS: tl.constexpr, OUT_PLANES: tl.constexpr, OPL_K: tl.constexpr, NBP2: tl.constexpr,
    PLANES_JOINT: tl.constexpr, X_WSUMS: tl.constexpr, OUT_WSUMS: tl.constexpr, CONV_EARLY: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_n = tl.program_id(1)
    if ROW_PROGRAMS:
        # program row pid_e serves input row pid_e alone (ROWS == 1): its input, output, routing and scale
        x_ptr += pid_e * sxm
        xpl_ptr += pid_e * sxpl_m
        opl_ptr += pid_e * sopl_m
        xws_ptr += pid_e * sxws_m
        ows_ptr += pid_e * sows_m
        out_ptr += pid_e * som
        rexp_ptr += pid_e
        rscale_ptr += pid_e
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    if ROUTED:
        # the expert of each row comes from the previous kernel: wait first, then read only this expert's tile
        # (EXPERT_READY: it comes from an earlier one, complete before this grid could start: read it and the tile,
        # then wait). One row: one program column, the row's expert. Several: column e serves the rows routed to
        # expert e and an idle column does nothing at all.
        if PDL and not EXPERT_READY:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rwt = 1.0
        if ROWS == 1:
            if ROUTE_ACC:  # the route from the accumulated norm (NormIn): no router kernel ran
                expert, rwt = _route_from_acc(nacc_ptr, nrb_ptr, n_width, n_eps, n_e, HAS_NRB, BLOCK_E)
            else:
                expert = tl.load(rexp_ptr)
            active = expert >= 0
        else:
            expert = pid_e
            r_idx = tl.arange(0, ROWS)
            routed = tl.load(rexp_ptr + r_idx, mask=r_idx < M, other=-1)
            active = tl.sum((routed == pid_e).to(tl.int32), axis=0) > 0
        if active:
            w, scale, zero, w_up, scale_up, zero_up = _load_weights(
                w_ptr, s_ptr, z_ptr, expert.to(tl.int64), rows, rows_ok, K, N_UP, swe, swn, sse, ssn, sze, szn, FMT,
                KP, NBP, WPG, TPB, GATED, 0)
            if NBP2 > 0:  # the row's last tiles, a second power-of-two piece (DecodePolicy.int4_tile_pieces)
                w2, scale2, zero2, w2_up, scale2_up, zero2_up = _load_weights(
                    w_ptr, s_ptr, z_ptr, expert.to(tl.int64), rows, rows_ok, K, N_UP, swe, swn, sse, ssn, sze, szn,
                    FMT, KP, NBP2, WPG, TPB, GATED, NBP)
            else:
                w2, scale2, zero2, w2_up, scale2_up, zero2_up = w, scale, zero, w_up, scale_up, zero_up
            if PDL and EXPERT_READY:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            _rows_out(w, scale, zero, w_up, scale_up, zero_up, x_ptr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
                      bias_ptr, rexp_ptr, rscale_ptr, out_ptr, som, co_ptr, scom, DI, rows, rows_ok, expert,
                      M, N, K, exp_bits, FMT, ROWS, ROUTED, CONV_W, HAS_CB, GATED, ACT, HAS_BIAS, HAS_RSCALE, KP,
                      NBP, WPG, TPB, UNPACK, CONV_EPI, MMA, xpl_ptr, sxpl_m, X_PLANES, XPL_K, XPL_SUMS,
                      opl_ptr, sopl_m, OUT_PLANES, OPL_K, rwt, nacc_ptr, n_width, n_eps, pres_ptr, pnw_ptr, pacc_ptr,
                      prw_ptr, srw_e, pux_ptr, p_e, NORM_IN, ROUTE_ACC, NORM_OUT, ROUTER_OUT, BLOCK_E,
                      w2, scale2, zero2, w2_up, scale2_up, zero2_up, NBP2, PLANES_JOINT, xws_ptr, sxws_m, X_WSUMS,
                      ows_ptr, sows_m, OUT_WSUMS, 0.0, 0.0, False)
    else:
        w, scale, zero, w_up, scale_up, zero_up = _load_weights(
            w_ptr, s_ptr, z_ptr, pid_e.to(tl.int64) * 0, rows, rows_ok, K, N_UP, swe, swn, sse, ssn, sze, szn, FMT,
            KP, NBP, WPG, TPB, GATED, 0)
        if NBP2 > 0:
            w2, scale2, zero2, w2_up, scale2_up, zero2_up = _load_weights(
                w_ptr, s_ptr, z_ptr, pid_e.to(tl.int64) * 0, rows, rows_ok, K, N_UP, swe, swn, sse, ssn, sze, szn,
                FMT, KP, NBP2, WPG, TPB, GATED, NBP)
        else:
            w2, scale2, zero2, w2_up, scale2_up, zero2_up = w, scale, zero, w_up, scale_up, zero_up
        if CONV_EARLY:  # the conv step's old state and weights of these channels, before the wait (one row)
            cpart, clast = _conv_operands(st_ptr, cw_ptr, cb_ptr, rows, DI, ss_d, CONV_W, HAS_CB)
        else:
            cpart, clast = 0.0, 0.0
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _rows_out(w, scale, zero, w_up, scale_up, zero_up, x_ptr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
                  bias_ptr, rexp_ptr, rscale_ptr, out_ptr, som, co_ptr, scom, DI, rows, rows_ok, pid_e,
                  M, N, K, exp_bits, FMT, ROWS, ROUTED, CONV_W, HAS_CB, GATED, ACT, HAS_BIAS, HAS_RSCALE, KP,
                  NBP, WPG, TPB, UNPACK, CONV_EPI, MMA, xpl_ptr, sxpl_m, X_PLANES, XPL_K, XPL_SUMS,
                  opl_ptr, sopl_m, OUT_PLANES, OPL_K, 1.0, nacc_ptr, n_width, n_eps, pres_ptr, pnw_ptr, pacc_ptr,
                  prw_ptr, srw_e, pux_ptr, p_e, NORM_IN, ROUTE_ACC, NORM_OUT, ROUTER_OUT, BLOCK_E,
                  w2, scale2, zero2, w2_up, scale2_up, zero2_up, NBP2, PLANES_JOINT, xws_ptr, sxws_m, X_WSUMS,
                  ows_ptr, sows_m, OUT_WSUMS, cpart, clast, CONV_EARLY)


@jit
def _conv_operands(st_ptr, cw_ptr, cb_ptr, rows, DI, ss_d, CONV_W: tl.constexpr, HAS_CB: tl.constexpr):
    """The conv step of channels ``rows`` (one row) but for its newest input: ``(sum_t state[t + 1] w[t] + b, w[W -
    1])``, fp32 ``[BN]`` in the layout of ``rows`` (0 past ``DI``)."""
    cm = rows < DI
    part = tl.zeros(rows.shape, tl.float32)
    for t in tl.static_range(CONV_W - 1):
        part += tl.load(st_ptr + rows * ss_d + (t + 1), mask=cm, other=0.0).to(tl.float32) * \
            tl.load(cw_ptr + rows * CONV_W + t, mask=cm, other=0.0).to(tl.float32)
    if HAS_CB:
        part += tl.load(cb_ptr + rows, mask=cm, other=0.0).to(tl.float32)
    return part, tl.load(cw_ptr + rows * CONV_W + (CONV_W - 1), mask=cm, other=0.0).to(tl.float32)


@jit
def _rstd_from_acc(acc_ptr, width, eps):
    """``1 / rms`` of a row from its accumulated sum of squares (``acc[0]``, :class:`NormOut`)."""
    return tl.rsqrt(tl.load(acc_ptr) / width + eps)


@jit
def _route_from_acc(acc_ptr, rb_ptr, width, eps, E, HAS_RB: tl.constexpr, BLOCK_E: tl.constexpr):
    """``(expert, weight)`` of the top-1 sigmoid router from an accumulated norm (:class:`NormOut`): logits
    ``rstd * acc[1 + e] (+ bias)``, ``p = sigmoid``, the first index of the largest p (as the add + norm kernel)."""
    e = tl.arange(0, BLOCK_E)
    em = e < E
    logits = _rstd_from_acc(acc_ptr, width, eps) * tl.load(acc_ptr + 1 + e, mask=em, other=0.0)
    if HAS_RB:
        logits += tl.load(rb_ptr + e, mask=em, other=0.0).to(tl.float32)
    p = tl.where(em, tl.sigmoid(logits), -1.0)
    best = tl.max(p, axis=0)
    return tl.min(tl.where(p == best, e, BLOCK_E), axis=0).to(tl.int32), best


@jit
def _norm_out(y, rows, rows_ok, res, nw, res_ptr, ux_ptr, acc_ptr, upl_ptr, UPL_K: tl.constexpr,
              UX_PLANES: tl.constexpr, uws_ptr, UX_WSUMS: tl.constexpr):
    """:class:`NormOut` of one row: ``h = residual + y`` written back, ``u = h * nw`` stored (as ``ux``'s type; its
    input planes 0..7 too, ``UX_PLANES``, and their word sums added into ``uws``, ``UX_WSUMS``), ``acc[0] += sum
    h^2`` over these rows. Returns u as stored, in fp32."""
    h = res + tl.where(rows_ok, y, 0.0)
    tl.store(res_ptr + rows, h, mask=rows_ok)
    uq = (h * nw).to(ux_ptr.dtype.element_ty)
    tl.store(ux_ptr + rows, uq, mask=rows_ok)
    u = uq.to(tl.float32)
    if UX_PLANES:
        store_x_planes(upl_ptr, rows, u, rows_ok, UPL_K)
    if UX_WSUMS:
        add_word_sums(uws_ptr, rows, u, rows_ok)
    # relaxed: the consumer reads the sums after this grid completes (acq_rel would fence every store before the
    # add, MEMBAR.ALL.GPU + CCTL.IVALL on sm_90, a memory round trip on the step's critical path)
    tl.atomic_add(acc_ptr, tl.sum(h * h, axis=0), sem="relaxed")
    return u


@jit
def _router_out(u, rw, acc_ptr, e, E):
    """``acc[1 + e] += sum over these rows of router_w[e] * u`` (``u`` as :func:`_norm_out` stored it)."""
    tl.atomic_add(acc_ptr + 1 + e, tl.sum(rw * u[None, :], axis=1), mask=e < E, sem="relaxed")


@jit
def _store_out(y, ri, ni, mask, out_ptr, som, co_ptr, scom, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, DI,
               CONV_EPI: tl.constexpr, CONV_W: tl.constexpr, HAS_CB: tl.constexpr, opl_ptr, sopl_m,
               OUT_PLANES: tl.constexpr, OPL_K: tl.constexpr, ows_ptr, sows_m, OUT_WSUMS: tl.constexpr,
               cpart, clast, CONV_EARLY: tl.constexpr):
    """Store ``y`` at rows ``ri`` / columns ``ni`` (broadcast together, ``mask``). ``CONV_EPI``: columns below ``DI``
    are also the new conv input of those channels, and ``co`` gets the conv step's output
    ``silu(sum_j state[j + 1] w[j] + y w[W-1] + b)`` of the stored (rounded) value, from the old conv state
    (``CONV_EARLY``, one row: ``y cw[W-1] + cpart``, the rest from :func:`_conv_operands` before the wait)."""
    yq = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ri * som + ni, yq, mask=mask)
    if OUT_PLANES:  # planes 0..7 of the stored output (the next GEMV's input); its word sums with OUT_WSUMS
        store_x_planes(opl_ptr + ri * sopl_m, ni, yq.to(tl.float32), mask, OPL_K)
    if OUT_WSUMS:
        add_word_sums(ows_ptr + ri * sows_m, ni, yq.to(tl.float32), mask)
    if CONV_EPI:
        cm = mask & (ni < DI)
        if CONV_EARLY:
            acc = yq.to(tl.float32) * clast + cpart
        else:
            acc = yq.to(tl.float32) * tl.load(cw_ptr + ni * CONV_W + (CONV_W - 1), mask=cm, other=0.0).to(tl.float32)
            for t in tl.static_range(CONV_W - 1):
                acc += tl.load(st_ptr + ri * ss_m + ni * ss_d + (t + 1), mask=cm, other=0.0).to(tl.float32) * \
                    tl.load(cw_ptr + ni * CONV_W + t, mask=cm, other=0.0).to(tl.float32)
            if HAS_CB:
                acc += tl.load(cb_ptr + ni, mask=cm, other=0.0).to(tl.float32)
        tl.store(co_ptr + ri * scom + ni, (acc * tl.sigmoid(acc)).to(co_ptr.dtype.element_ty), mask=cm)


@jit
def _rows_out(w, scale, zero, w_up, scale_up, zero_up, x_ptr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
              bias_ptr, rexp_ptr, rscale_ptr, out_ptr, som, co_ptr, scom, DI, rows, rows_ok, expert, M, N, K,
              exp_bits, FMT: tl.constexpr, ROWS: tl.constexpr, ROUTED: tl.constexpr,
              CONV_W: tl.constexpr, HAS_CB: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr,
              WPG: tl.constexpr, TPB: tl.constexpr, UNPACK: tl.constexpr, CONV_EPI: tl.constexpr, MMA: tl.constexpr,
              xpl_ptr, sxpl_m, X_PLANES: tl.constexpr, XPL_K: tl.constexpr, XPL_SUMS: tl.constexpr,
              opl_ptr, sopl_m, OUT_PLANES: tl.constexpr, OPL_K: tl.constexpr, rwt, nacc_ptr, n_width, n_eps,
              pres_ptr, pnw_ptr, pacc_ptr, prw_ptr, srw_e, pux_ptr, p_e, NORM_IN: tl.constexpr,
              ROUTE_ACC: tl.constexpr, NORM_OUT: tl.constexpr, ROUTER_OUT: tl.constexpr, BLOCK_E: tl.constexpr,
              w2, scale2, zero2, w2_up, scale2_up, zero2_up, NBP2: tl.constexpr, PLANES_JOINT: tl.constexpr,
              xws_ptr, sxws_m, X_WSUMS: tl.constexpr, ows_ptr, sows_m, OUT_WSUMS: tl.constexpr,
              cpart, clast, CONV_EARLY: tl.constexpr):
    """Each input row (that is routed here) times the tile(s), epilogue, store. A row that is not computed costs a
    branch, no arithmetic. ``NORM_IN`` / ``ROUTE_ACC`` / ``NORM_OUT``: see :class:`NormIn` and :class:`NormOut` (one
    input row only; ``rwt`` is the row's routing weight where ``ROUTE_ACC``). ``NBP2 > 0`` (input planes only): the
    tile row comes in two pieces, ``w`` of ``NBP`` tiles and ``w2`` of the ``NBP2`` after them. ``PLANES_JOINT``
    (input planes): every product of the row (both pieces; gate and up rows from one read of the input) before any
    of their reductions, whose barriers would otherwise hold the next product's input loads back, and the word sums
    read in the tile's shape. ``X_WSUMS``: the input's word sums are the row at ``xws`` (added there by its
    producer), not plane 8; ``OUT_WSUMS``: the output's planes' word sums are added into ``ows``."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    if NORM_IN:  # the row's sum of squares, issued before the products (its latency hides under theirs)
        rstd = _rstd_from_acc(nacc_ptr, n_width, n_eps)
    if NORM_OUT:  # the next norm's weight (and router columns) of this program's rows: issued before the products
        pnw = tl.load(pnw_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
        if ROUTER_OUT:
            pe = tl.arange(0, BLOCK_E)
            prw = tl.load(prw_ptr + pe[:, None] * srw_e + rows[None, :], mask=(pe < p_e)[:, None] & rows_ok[None, :],
                          other=0.0).to(tl.float32)
        pres = tl.load(pres_ptr + rows, mask=rows_ok, other=0.0)
    if FMT == 3 and ROWS > 1 and MMA:
        # plane tiles and several rows: tensor cores, all rows (routed here) at once; ROWS is at least 16 here
        rr = tl.arange(0, ROWS)
        rok = rr < M
        if ROUTED:
            rok = rok & (tl.load(rexp_ptr + rr, mask=rok, other=-1) == expert)
        y = _dot_rows_mma(w, scale, zero, x_ptr, rr, rok, sxm, K, NBP)                              # [ROWS, BN]
        if HAS_BIAS:
            y += bias[None, :]
        if GATED:
            y = activate(y, ACT) * _dot_rows_mma(w_up, scale_up, zero_up, x_ptr, rr, rok, sxm, K, NBP)
        if HAS_RSCALE:
            y = y * tl.load(rscale_ptr + rr, mask=rok, other=0.0).to(tl.float32)[:, None]
        _store_out(y, rr[:, None], rows[None, :], rok[:, None] & rows_ok[None, :], out_ptr, som, co_ptr, scom,
                   st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, DI, CONV_EPI, CONV_W, HAS_CB, opl_ptr, sopl_m, OUT_PLANES,
                   OPL_K, ows_ptr, sows_m, OUT_WSUMS, cpart, clast, CONV_EARLY)
    elif (FMT == 2 or FMT == 3) and ROWS > 1 and not ROUTED:
        # every row uses the same tile: unpack each code once, multiply it into all rows
        rr = tl.arange(0, ROWS)
        y = _dot_rows_int4(w, scale, zero, x_ptr, rr, sxm, K, M, exp_bits, FMT, NBP, WPG, UNPACK)  # [ROWS, BN]
        if HAS_BIAS:
            y += bias[None, :]
        if GATED:
            y = activate(y, ACT) * _dot_rows_int4(w_up, scale_up, zero_up, x_ptr, rr, sxm, K, M, exp_bits, FMT,
                                                  NBP, WPG, UNPACK)
        if HAS_RSCALE:
            y = y * tl.load(rscale_ptr + rr, mask=rr < M, other=0.0).to(tl.float32)[:, None]
        _store_out(y, rr[:, None], rows[None, :], (rr < M)[:, None] & rows_ok[None, :], out_ptr, som, co_ptr,
                   scom, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, DI, CONV_EPI, CONV_W, HAS_CB, opl_ptr, sopl_m,
                   OUT_PLANES, OPL_K, ows_ptr, sows_m, OUT_WSUMS, cpart, clast, CONV_EARLY)
    else:
        for r in tl.static_range(ROWS):
            row_ok = (tl.program_id(1) * 0 + r) < M  # a tensor (the interpreter rejects a Python bool mask)
            if ROUTED and ROWS > 1:
                row_ok = row_ok & (tl.load(rexp_ptr + r, mask=row_ok, other=-1) == expert)
            if row_ok:
                binary_pair: tl.constexpr = FMT == 4 and UNPACK >= 2 and GATED  # gate and up rows in one pass
                if X_PLANES:
                    xr = xpl_ptr + r * sxpl_m  # this row's input planes, and where its word sums are
                    if X_WSUMS:
                        xs_row = xws_ptr + r * sxws_m
                    else:
                        xs_row = xr + 8 * XPL_K
                if X_PLANES and PLANES_JOINT:
                    pa, pa_up = _planes_parts(w, zero, w_up, zero_up, xr, xs_row, K, row_ok, NBP, WPG, UNPACK, XPL_K,
                                              XPL_SUMS, 0, GATED, True)
                    if NBP2 > 0:
                        pb, pb_up = _planes_parts(w2, zero2, w2_up, zero2_up, xr, xs_row, K, row_ok, NBP2, WPG, UNPACK,
                                                  XPL_K, XPL_SUMS, NBP, GATED, True)
                    y = _planes_reduce(pa, scale)
                    if NBP2 > 0:
                        y += _planes_reduce(pb, scale2)
                    if GATED:
                        up = _planes_reduce(pa_up, scale_up)
                        if NBP2 > 0:
                            up += _planes_reduce(pb_up, scale2_up)
                elif X_PLANES:
                    y = _dot_row_planes(w, scale, zero, w2, scale2, zero2, xr, xs_row, K, row_ok, NBP, NBP2, WPG,
                                        UNPACK, XPL_K, XPL_SUMS)
                elif binary_pair:
                    y, up = _dot_row_binary(w, w_up, scale, zero, x_ptr, r, sxm, tl.where(row_ok, K, 0), KP, True)
                else:
                    y = _dot_row(w, scale, zero, x_ptr, r, sxm, K, row_ok, exp_bits, FMT, KP, NBP, WPG, UNPACK)
                if NORM_IN:  # the input was h * norm weight: the row's 1 / rms now (linear in the input)
                    y = y * rstd
                if HAS_BIAS:
                    y += bias
                if GATED:
                    if X_PLANES and not PLANES_JOINT:
                        up = _dot_row_planes(w_up, scale_up, zero_up, w2_up, scale2_up, zero2_up, xr, xs_row, K,
                                             row_ok, NBP, NBP2, WPG, UNPACK, XPL_K, XPL_SUMS)
                    elif not binary_pair and not X_PLANES:  # (binary_pair, joint planes: computed with y above)
                        up = _dot_row(w_up, scale_up, zero_up, x_ptr, r, sxm, K, row_ok, exp_bits, FMT, KP, NBP, WPG,
                                      UNPACK)
                    if NORM_IN:
                        up = up * rstd
                    y = activate(y, ACT) * up
                if HAS_RSCALE:
                    if ROUTE_ACC:
                        y = y * rwt
                    else:
                        y = y * tl.load(rscale_ptr + r).to(tl.float32)
                if NORM_OUT:  # the next layer's add + norm, but for its 1 / rms (see NormOut)
                    u = _norm_out(y, rows, rows_ok, pres, pnw, pres_ptr, pux_ptr, pacc_ptr, opl_ptr, OPL_K, OUT_PLANES,
                                  ows_ptr, OUT_WSUMS)
                    if ROUTER_OUT:
                        _router_out(u, prw, pacc_ptr, pe, p_e)
                else:
                    _store_out(y, r, rows, rows_ok, out_ptr, som, co_ptr, scom, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
                               DI, CONV_EPI, CONV_W, HAS_CB, opl_ptr, sopl_m, OUT_PLANES, OPL_K, ows_ptr, sows_m,
                               OUT_WSUMS, cpart, clast, CONV_EARLY)


# ---- launcher and reference twin -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormOut:
    """A producer's epilogue that does the next layer's residual add and RMSNorm but for its ``1 / rms`` (one input
    row): ``residual [1, D]`` fp32 += the output, in place; ``x [1, D]`` <- ``u = residual * weight`` (its int4
    input planes 0..7 into ``planes [1, 9, width]`` if given); ``acc [1 + E]`` fp32 (zeroed by the caller) +=
    ``[sum residual^2, router_w @ u]`` by atomic adds (``router_w [E, D]``: an MoE layer's router, else None). The
    output itself is not stored. Its consumer (:class:`NormIn`) multiplies its products by ``rsqrt(acc[0] / D +
    eps)``: a linear layer of the normed row equals ``rstd`` times the same layer of ``u``, so the add + norm kernel
    between two GEMVs goes."""

    residual: torch.Tensor
    weight: torch.Tensor
    acc: torch.Tensor
    x: torch.Tensor
    planes: torch.Tensor | None = None
    router_w: torch.Tensor | None = None
    word_sums: torch.Tensor | None = None  # [1, width / 8] fp32, zeroed by the caller: the planes' word sums (plane
    #                                        8's values) are added into it (DecodePolicy.producer_word_sums)


@dataclass(frozen=True)
class NormIn:
    """A consumer of :class:`NormOut`: its input ``x`` is ``u``; its products are multiplied by ``rsqrt(acc[0] /
    width + eps)`` (``scale``, the matrix reads ``u``; in_proj, fc1, the head) and / or, ``route``, the routed
    expert and its weight come from ``acc``'s router sums: ``p = sigmoid(rstd * acc[1 + e] + router_b)``, the first
    largest (fc1 and fc2 of the MoE layer; fc2 multiplies by ``p`` as ``row_scale`` would)."""

    acc: torch.Tensor
    width: int
    eps: float
    scale: bool = True
    route: bool = False
    router_b: torch.Tensor | None = None


def _check_norm_args(m: int, n_out: int, k: int, norm_in: NormIn | None, norm_out: NormOut | None):
    if (norm_in is not None or norm_out is not None) and m != 1:
        raise ValueError("decode_linear: norm_in / norm_out take one input row")
    if norm_in is not None:
        if norm_in.acc.dtype != torch.float32 or norm_in.acc.dim() != 1 or norm_in.acc.numel() < 1:
            raise ValueError("decode_linear: norm_in.acc must be a 1-D float32 tensor")
        if norm_in.scale and norm_in.width != k:
            raise ValueError(f"decode_linear: norm_in.width {norm_in.width} must be the input width {k}")
    if norm_out is not None:
        o = norm_out
        if tuple(o.residual.shape) != (1, n_out) or o.residual.dtype != torch.float32 or not o.residual.is_contiguous():
            raise ValueError(f"decode_linear: norm_out.residual must be a contiguous float32 [1, {n_out}]")
        if tuple(o.x.shape) != (1, n_out) or not o.x.is_contiguous() or o.weight.numel() != n_out:
            raise ValueError(f"decode_linear: norm_out.x must be a contiguous [1, {n_out}], weight [{n_out}]")
        e = o.router_w.shape[0] if o.router_w is not None else 0
        if o.acc.dtype != torch.float32 or o.acc.dim() != 1 or o.acc.numel() < 1 + e:
            raise ValueError(f"decode_linear: norm_out.acc must be a 1-D float32 tensor of at least {1 + e}")
        if o.router_w is not None and (o.router_w.shape[1] != n_out or o.router_w.stride(1) != 1):
            raise ValueError(f"decode_linear: norm_out.router_w must be [E, {n_out}] with a unit last stride")


def _version_of(t: torch.Tensor):
    """The in-place version counter of ``t``, or None for an inference tensor (which keeps none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def binary_denorm_of(weight: BinaryWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_denorm, gamma)`` of a 1-bit weight (:func:`qmamba.quant.layout.binary_denorm_vectors`), computed
    once and kept on the record (recomputed if ``alpha`` / ``beta`` changed in place). Callers that capture CUDA
    graphs call it before capture."""
    key = tuple((t.data_ptr(), _version_of(t)) for t in (weight.alpha, weight.beta))
    cached = weight.__dict__.get("_denorm")
    if cached is None or cached[0] != key:
        cached = (key, binary_denorm_vectors(weight.alpha, weight.beta))
        weight.__dict__["_denorm"] = cached
    return cached[1]


def _weight_args(weight: PackedWeight | BinaryWeight, denorm: bool = False):
    """``(w, s, z, strides, KP, NBP, WPG, TPB)`` as the kernel reads them (int4: int32 words in tiles, binary: sign
    words with alpha / beta, or with ``denorm`` alpha_denorm / gamma, see :func:`_load_tile` and
    :func:`binary_denorm_of`)."""
    if isinstance(weight, BinaryWeight):
        words = binary_words(weight)
        if words is None:
            raise ValueError("decode_linear: a 1-bit weight needs K a multiple of 32, aligned sign words and no row "
                             "scale")
        a, b = binary_denorm_of(weight) if denorm else (weight.alpha, weight.beta)
        return (words, a, b, (words.stride(0), words.stride(1), a.stride(0), 0, b.stride(0), 0),
                next_pow2(weight.k // 32), 1, 1, 1)
    s, z = weight.scales, weight.zeros
    g = weight.group_size
    if weight.fmt == FMT_INT4:
        words = int32_words(weight.qweight)
        if words is None:
            raise ValueError("decode_linear: int4 rows are not a whole number of aligned 32-bit words")
        if g % 8:
            raise ValueError(f"decode_linear: int4 group size {g} is not a multiple of 8")
        tiles, wpg, tpb = weight.k_padded // g, g // 8, 1
    elif weight.fmt == FMT_INT4_PLANES:
        words = weight.qweight
        if g % INT4_TILE:
            raise ValueError(f"decode_linear: int4 planes need a group size that is a multiple of {INT4_TILE}, got {g}")
        tiles, wpg, tpb = words.shape[-1] // INT4_TILE_WORDS, INT4_TILE_WORDS, g // INT4_TILE
    else:
        q = weight.qweight
        s = s if s is not None else q
        return q, s, q, (q.stride(0), q.stride(1), s.stride(0), s.stride(1) if s.dim() > 1 else 0, 0, 0), \
            next_pow2(weight.k), 1, 1, 1
    return (words, s, z, (words.stride(0), words.stride(1), s.stride(0), s.stride(1), z.stride(0), z.stride(1)),
            1, next_pow2(tiles), wpg, tpb)


def decode_linear(x, weight: PackedWeight | BinaryWeight, out, *, bias=None, row_expert=None, row_scale=None, conv_out=None,
                  gated: str | None = None, policy: DecodePolicy | None = None, expert_ready: bool = False,
                  x_planes=None, x_plane_sums: bool = True, out_planes=None, norm_in: NormIn | None = None,
                  norm_out: NormOut | None = None, x_word_sums=None, out_word_sums=None, conv_ready: bool = False):
    """``out [M, N']`` (any float dtype) receives ``f(x) @ W_hat^T`` for ``M <= 8`` rows; semantics of
    :func:`decode_linear_ref`.

    ``conv_out = (conv_state [M, D, W], conv_w [D, W], conv_b [D] | None, xc [M, D])``: the first ``D`` output
    columns are the new conv input of ``D`` channels, and ``xc`` also receives the conv step's output of them (the
    same function of the stored output; in_proj's epilogue, so that x_proj reads a finished input).
    ``conv_ready`` (one row): the conv state was written two launches or more before this one, so it and the conv
    weights are read with the weight, before the wait of programmatic dependent launch (the launch before this one
    waited for the one before it before letting this one start), not in the epilogue (``DecodePolicy.early_reads``).
    ``gated = activation name``: the weight is ``[.., 2F, K]`` and ``out [M, F]`` gets ``act(x W_gate^T) * (x W_up^T)``
    (the bias, if any, applies to the gate half only and must be None for gated weights).
    ``row_expert [M]`` int32 picks each row's expert of a stacked weight; ``row_scale [M]`` multiplies each row.
    ``expert_ready``: with programmatic dependent launch, ``row_expert`` was written by a kernel before the previous
    one (fc2 after fc1: the router ran before fc1), so the expert's tile is loaded before waiting for the previous
    kernel, as unrouted weights are.
    ``x_planes [M, 9, k_pad]`` fp32: ``x``'s int4 input planes (:func:`qmamba.quant.layout.int4_x_planes`, as
    :func:`qmamba.kernels.decode_step.add_norm` writes them), read instead of ``x`` where the kernel takes int4 plane
    words with "denorm" codes one input row a program; ignored elsewhere. ``x_plane_sums=False``: their plane 8 (the
    word sums) is not written (a producer other than add + norm); the kernel sums the words itself.
    ``out_planes [M, 9, width]`` fp32: planes 0..7 receive the input planes of ``out`` as stored (the next GEMV's
    input; zero-initialised by the caller, whose padding columns stay 0).
    ``norm_out`` (:class:`NormOut`) / ``norm_in`` (:class:`NormIn`), one row: the add + norm between this GEMV and
    the next done in their epilogue / prologue (``out`` is then not written; ``out_planes`` must be None).
    ``x_word_sums [M, width / 8]`` fp32: the word sums of ``x_planes`` (plane 8's values), read instead of plane 8
    where the planes are read (a producer added them there: ``DecodePolicy.producer_word_sums``).
    ``out_word_sums [M, width / 8]`` fp32, with ``out_planes`` (``norm_out.word_sums`` with its planes): zeroed by
    the caller; the word sums of the planes written are added into it by atomic adds.
    """
    policy = policy or DecodePolicy.for_device(x.device)
    m, k = x.shape
    if k != weight.k or m > MAX_ROWS or m < 1:
        raise ValueError(f"decode_linear: x must be [1..{MAX_ROWS}, {weight.k}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("decode_linear: x needs a unit stride along K")
    n_out = weight.n // 2 if gated else weight.n
    if tuple(out.shape) != (m, n_out) or out.stride(1) != 1:
        raise ValueError(f"decode_linear: out must be a row-major [{m}, {n_out}] tensor, got {tuple(out.shape)}")
    if gated and bias is not None:
        raise ValueError("decode_linear: a gated weight takes no bias")
    if row_expert is None and weight.n_experts != 1:
        raise ValueError("decode_linear: a stacked weight needs row_expert")
    w, s, z, strides, kp, nbp, wpg, tpb = _weight_args(weight, denorm=policy.denorm_reading)
    st, cw, cb, co = conv_out if conv_out is not None else (x, x, None, out)
    channels = co.shape[1] if conv_out is not None else 0
    if conv_out is not None:
        width = cw.shape[1]
        if tuple(st.shape) != (m, channels, width) or st.stride(2) != 1 or tuple(cw.shape) != (channels, width) or \
                not cw.is_contiguous():
            raise ValueError("decode_linear: conv needs state [M, D, W] (unit last stride) and contiguous w [D, W]")
        if co.shape[0] != m or co.stride(1) != 1 or channels > n_out:
            raise ValueError(f"decode_linear: conv_out needs a row-major xc [{m}, D <= {n_out}]")
    _check_norm_args(m, n_out, k, norm_in, norm_out)
    if norm_in is not None and norm_in.route and row_expert is None:
        raise ValueError("decode_linear: norm_in.route needs a stacked weight (row_expert names the fallback buffer)")
    if norm_out is not None and out_planes is not None:
        raise ValueError("decode_linear: norm_out writes the planes of its own x (norm_out.planes), not out_planes")
    # routed rows as program rows (DecodePolicy.routed_row_programs): each the one-row kernel on its own expert
    row_programs = row_expert is not None and m > 1 and policy.routed_row_programs and conv_out is None
    rows = 1 if row_programs else m  # input rows a program computes
    mma = weight.fmt == FMT_INT4_PLANES and rows > 1 and policy.planes_mma  # the tensor-core path of plane tiles
    bn = MMA_ROWS if mma else policy.block_n(weight.fmt, rows, n_out, gated=gated is not None)
    grid = (m if row_programs else weight.n_experts if row_expert is not None and m > 1 else 1, -(-n_out // bn))
    dummy = x
    kwargs = pdl_launch(policy.pdl)
    warps = policy.num_warps
    unpack = INT4_UNPACK[policy.int4_unpack]
    narrow = nbp * wpg < 4 * 32 * warps  # a weight row's tiles fewer words than the program's threads x 4
    wide = policy.int4_x_in_tile_wide == "always" or (policy.int4_x_in_tile_wide == "row_programs" and row_programs)
    if unpack == 2 and policy.int4_x_in_tile and rows == 1 and (narrow or wide):
        unpack = UNPACK_DENORM_X_IN_TILE
    use_planes = x_planes is not None and weight.fmt == FMT_INT4_PLANES and rows == 1 and unpack in (2, 3)
    kpad = check_x_planes("decode_linear", "x_planes", x_planes, m, k) if use_planes else 1
    xws = x_word_sums if use_planes else None
    if xws is not None:
        check_word_sums("decode_linear", "x_word_sums", xws, m, kpad)
    nbp2 = 0
    if use_planes and policy.int4_tile_pieces and unpack == UNPACK_DENORM_X_IN_TILE:
        nbp, nbp2 = tile_pieces(w.shape[-1] // wpg)
    if norm_out is not None and norm_out.planes is not None:
        out_planes = norm_out.planes
    opl_k = check_x_planes("decode_linear", "out_planes", out_planes, m, n_out) if out_planes is not None else 1
    ows = norm_out.word_sums if norm_out is not None else out_word_sums
    if ows is not None:
        if out_planes is None:
            raise ValueError("decode_linear: word sums of the output need its planes (out_planes / norm_out.planes)")
        check_word_sums("decode_linear", "out_word_sums", ows, m, opl_k)
    if mma and (norm_in is not None or norm_out is not None):
        raise ValueError("decode_linear: norm_in / norm_out are not served by the tensor-core tiles")
    nin, nout = norm_in, norm_out
    n_e = nin.acc.numel() - 1 if nin is not None else 0
    p_e = nout.router_w.shape[0] if nout is not None and nout.router_w is not None else 0
    rw = nout.router_w if p_e else dummy
    _decode_linear_kernel[grid](
        x, st, cw, cb if cb is not None else dummy, w, s, z, bias if bias is not None else dummy,
        row_expert if row_expert is not None else dummy, row_scale if row_scale is not None else dummy, out, co,
        x_planes if use_planes else dummy, out_planes if out_planes is not None else dummy,
        1 if row_programs else m, n_out, k, n_out if gated else 0, channels, x.stride(0), st.stride(0), st.stride(1),
        out.stride(0),
        co.stride(0), *strides, _FLOAT_2P23_BITS, x_planes.stride(0) if use_planes else 0,
        out_planes.stride(0) if out_planes is not None else 0,
        nin.acc if nin is not None else dummy,
        nin.router_b if nin is not None and nin.router_b is not None else dummy,
        nin.width if nin is not None else 1, float(nin.eps) if nin is not None else 0.0, n_e,
        nout.residual if nout is not None else dummy, nout.weight if nout is not None else dummy,
        nout.acc if nout is not None else dummy, rw, rw.stride(0) if p_e else 0,
        nout.x if nout is not None else dummy, p_e,
        xws if xws is not None else dummy, ows if ows is not None else dummy,
        xws.stride(0) if xws is not None else 0, ows.stride(0) if ows is not None else 0,
        NORM_IN=nin is not None and nin.scale, ROUTE_ACC=nin is not None and nin.route and row_expert is not None,
        HAS_NRB=nin is not None and nin.router_b is not None, NORM_OUT=nout is not None, ROUTER_OUT=p_e > 0,
        BLOCK_E=next_pow2(max(n_e, p_e, 1)),
        FMT=weight.fmt, ROWS=max(MMA_ROWS, next_pow2(rows)) if mma else next_pow2(rows), ROUTED=row_expert is not None,
        CONV_EPI=conv_out is not None, CONV_W=cw.shape[1] if conv_out is not None else 1, HAS_CB=cb is not None,
        GATED=gated is not None,
        ACT=ACTIVATION_IDS[gated] if gated else 0, HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None,
        KP=kp, NBP=nbp, WPG=wpg, TPB=tpb, UNPACK=unpack, MMA=mma, BLOCK_N=bn, PDL=policy.pdl,
        EXPERT_READY=expert_ready and row_expert is not None, ROW_PROGRAMS=row_programs, X_PLANES=use_planes,
        XPL_K=kpad, XPL_SUMS=bool(x_plane_sums) or xws is not None, OUT_PLANES=out_planes is not None, OPL_K=opl_k,
        NBP2=nbp2,
        PLANES_JOINT=use_planes and policy.planes_joint and (policy.planes_joint_batched or not row_programs)
        and (policy.planes_joint_gated or gated is None),
        X_WSUMS=xws is not None, OUT_WSUMS=ows is not None,
        CONV_EARLY=bool(conv_ready and conv_out is not None and m == 1 and row_expert is None),
        num_warps=warps,
        **kwargs)
    return out


def route_from_acc_ref(norm_in: NormIn) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of the kernels' route from :class:`NormIn`'s sums: ``(expert [1] int32, weight [1] fp32)``."""
    acc = norm_in.acc.float()
    logits = torch.rsqrt(acc[0] / norm_in.width + norm_in.eps) * acc[1:]
    if norm_in.router_b is not None:
        logits = logits + norm_in.router_b.float()
    weight, idx = torch.sigmoid(logits).max(dim=-1)
    return idx.reshape(1).to(torch.int32), weight.reshape(1)


def norm_out_ref(y, norm_out: NormOut) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of :class:`NormOut` for a GEMV output ``y [1, D]``: ``(new residual fp32, u as x's type, acc fp32
    [1 + E])``: the sums over the whole row, as the kernels' atomic adds leave them."""
    h = norm_out.residual.float() + y.float()
    u = (h * norm_out.weight.float()).to(norm_out.x.dtype)
    sums = [(h * h).sum().reshape(1)]
    if norm_out.router_w is not None:
        sums.append(norm_out.router_w.float() @ u.float()[0])
    return h, u, torch.cat(sums)


def decode_linear_ref(x, weight: PackedWeight | BinaryWeight, *, bias=None, row_expert=None, row_scale=None,
                      gated: str | None = None, norm_in: NormIn | None = None):
    """Twin of :func:`decode_linear` in fp32 over the dequantized weight: ``[M, N']`` (``norm_in``: the input
    scaled by its ``1 / rms``, and / or the expert and its weight from its router sums)."""
    xf = x.float()
    if norm_in is not None:
        if norm_in.scale:
            xf = xf * torch.rsqrt(norm_in.acc[0].float() / norm_in.width + norm_in.eps)
        if norm_in.route:
            row_expert, w = route_from_acc_ref(norm_in)
            if row_scale is not None:
                row_scale = w
    w = weight.dequantized(torch.float32)
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if row_expert is None else row_expert.long()
    y = torch.einsum("mk,mnk->mn", xf, w[idx])
    if bias is not None:
        y = y + bias.float()
    if gated:
        y = gated_act_ref(y, gated, True).float()
    if row_scale is not None:
        y = y * row_scale.float()[:, None]
    return y
