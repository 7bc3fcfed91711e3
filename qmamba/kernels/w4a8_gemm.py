"""W4A8 GEMM: int4 group-wise weights (plane words) times int8 activations on int8 tensor cores, in Triton.

A candidate for the prefill (M in the hundreds to thousands), where the bf16 GEMMs are bound by the tensor cores and
an int4 weight dequantized to bf16 can at best tie them (benchmarks/results.md, session 36). Here neither operand
is converted to a float in the K loop:

* the activations are quantized once per row (:func:`quantize_rows_int8`: a per-row scale, ``x / scale`` rounded
  to an integer in [-127, 127]) and stored in plane-byte order (:func:`qmamba.quant.layout.int8_x_plane_order`),
  with each 128-column tile's sum of codes. The rounding is defined once (:func:`int8_row_scale`,
  :func:`int8_codes`, :func:`plane_byte_inputs`) for every kernel that writes such rows: the batched decode step's
  add + norm (:func:`qmamba.kernels.decode_step.add_norm`, for :mod:`qmamba.kernels.w4a8_rows`) and, with
  ``MatmulPolicy.w4a8_route_quantizes``, the MoE prefill's routing kernel for fc1
  (:func:`qmamba.kernels.fused_moe.route_top1_int8`), whose rows :func:`w4a8_linear` then takes as ``x_int8``;
* the weight's plane words are read as bytes: a mask gives the low nibbles and a shift and a mask the high ones,
  four codes a 32-bit instruction, as int8 operands of ``tl.dot`` (``code`` in 0..15 is exact in int8);
* per 128-column tile (one quantization group, or a part of one), the exact int32 product of the codes is scaled by
  the group scale into a float32 accumulator (two instructions an output a tile: the conversion and an FMA); the zero
  points' share, ``sum over tiles of scale * zero * sum(x codes)``, is one small product after the K loop, on tensor
  cores in three-pass tf32 (~fp32); the row scale multiplies the sum at the end. The weight is the plane-word record
  as the other int4 kernels read it (fp16 group scales, packed zero points): nothing is stored for this kernel;
* the product can be taken as ``W x^T`` (``weight_left``, the default tile of ``MatmulPolicy.w4a8_tile``): the
  masked codes are then the tensor cores' left operand, read from registers, with no shared-memory copy of the
  unpacked tile; a gated fc1 writes ``act(gate) * up`` from its epilogue (``gate``).

So ``out = x_hat @ W_hat^T`` exactly up to float32 accumulation, where ``x_hat`` is the quantized activation
(:func:`dequantize_rows_int8`): the activation quantization is the only approximation. int8 tensor cores run at
twice the bf16 rate (sm_80 / sm_90). The pure-PyTorch twins are :func:`quantize_rows_int8_ref` and
:func:`w4a8_gemm_ref` (the latter from the dequantized weight and activation, not from the codes).
"""

from __future__ import annotations

import torch

from qmamba.kernels._triton import cdiv, jit, libdevice, next_pow2, pdl_launch, tl
from qmamba.kernels.activations import ACTIVATION_IDS
from qmamba.kernels.dequant_gemm import gated_epilogue, weight_rows
from qmamba.kernels.routing import ExpertTiles, expert_tile_map, program_rows, swizzled_program
from qmamba.kernels.weights import FMT_INT4_PLANES, PackedWeight
from qmamba.quant.layout import INT4_TILE, int8_x_plane_order

INT8_MAX = 127


def sum_columns(k_pad: int) -> int:
    """Columns of the tile sums of an input of ``k_pad`` columns: one a 128-column tile, padded with zeros to a power
    of two of at least 16 (the K of the zero points' product)."""
    return max(16, next_pow2(k_pad // INT4_TILE))


def check_int8_operands(who: str, x_int8, rows: int, k: int) -> int:
    """Refuse buffers ``x_int8 = (codes, scale, sums)`` that a kernel writing :func:`quantize_rows_int8`'s output for
    ``rows`` rows of ``k`` inputs cannot fill: contiguous int8 codes ``[rows, k_pad]`` (``k_pad`` a multiple of 128,
    at least ``k``), a contiguous float32 scale ``[rows]`` and float32 sums ``[rows, sum_columns(k_pad)]`` with
    contiguous rows. Returns ``k_pad``."""
    if not (isinstance(x_int8, (tuple, list)) and len(x_int8) == 3
            and all(isinstance(t, torch.Tensor) for t in x_int8)):
        raise ValueError(f"{who}: x_int8 must be the tuple (codes, scale, sums) of quantize_rows_int8")
    codes, scale, sums = x_int8
    k_pad = codes.shape[-1] if codes.dim() == 2 else 0
    if (codes.dim() != 2 or codes.shape[0] != rows or codes.dtype != torch.int8 or not codes.is_contiguous()
            or k_pad % INT4_TILE or k_pad < k):
        raise ValueError(f"{who}: x_int8's codes must be contiguous [{rows}, k_pad] int8, k_pad >= {k} a multiple of "
                         f"{INT4_TILE}, got {tuple(codes.shape)} {codes.dtype}")
    if tuple(scale.shape) != (rows,) or scale.dtype != torch.float32 or scale.stride(0) != 1:
        raise ValueError(f"{who}: x_int8's scale must be contiguous [{rows}] float32, got {tuple(scale.shape)} "
                         f"{scale.dtype}")
    if tuple(sums.shape) != (rows, sum_columns(k_pad)) or sums.dtype != torch.float32 or sums.stride(1) != 1:
        raise ValueError(f"{who}: x_int8's sums must be [{rows}, {sum_columns(k_pad)}] float32 with contiguous rows, "
                         f"got {tuple(sums.shape)} {sums.dtype}")
    return k_pad


def quantize_rows_int8_ref(x: torch.Tensor, k_pad: int):
    """``x [M, K]`` -> ``(codes [M, k_pad] int8 in plane-byte order, scale [M] float32, sums [M, sum_columns(k_pad)]
    float32)``: ``code = floor(x * (1 / scale) + 1/2)`` with ``scale = max |x| / 127`` per row (1 where the row is all
    zeros); padding columns hold 0; ``sums`` are each 128-column tile's code sums (exact integers), then zeros."""
    m, k = x.shape
    xf = x.float()
    amax = xf.abs().amax(dim=1) if k else xf.new_zeros(m)
    # amax / 127 correctly rounded, as the kernel divides (a tensor over a Python number is a multiply by the
    # reciprocal on CUDA, one rounding more)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, INT8_MAX), torch.ones_like(amax))
    inv = torch.ones_like(scale) / scale  # correctly rounded (a tensor over a tensor), as the kernel's
    q = torch.floor(xf * inv[:, None] + 0.5).clamp(-INT8_MAX, INT8_MAX)
    q = torch.nn.functional.pad(q, (0, k_pad - k))
    sums = q.reshape(m, k_pad // INT4_TILE, INT4_TILE).sum(-1)
    sums = torch.nn.functional.pad(sums, (0, sum_columns(k_pad) - sums.shape[1]))
    codes = q[:, int8_x_plane_order(k_pad).to(x.device)].to(torch.int8)
    return codes, scale, sums


def dequantize_rows_int8(codes: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """The activation the W4A8 GEMM multiplies: ``[M, k]`` float32 from :func:`quantize_rows_int8`'s codes (plane-byte
    order) and row scales."""
    order = int8_x_plane_order(codes.shape[1]).to(codes.device)
    x = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    x[:, order] = codes.float()
    return x[:, :k] * scale[:, None]


def int8_rounded_ref(x: torch.Tensor) -> torch.Tensor:
    """The activation the W4A8 path multiplies: ``x [..., K]`` quantized per row as :func:`quantize_rows_int8_ref`
    does, and dequantized, in x's shape and dtype."""
    k = x.shape[-1]
    codes, scale, _ = quantize_rows_int8_ref(x.reshape(-1, k), -(-k // INT4_TILE) * INT4_TILE)
    return dequantize_rows_int8(codes, scale, k).to(x.dtype).reshape(x.shape)


def w4a8_gemm_ref(codes, scale, weight: PackedWeight, bias=None, row_expert=None, row_scale=None) -> torch.Tensor:
    """``[M, N]`` float32: the dequantized activation times the dequantized weight (row m on expert
    ``row_expert[m]``, 0 when None), plus ``bias``, times ``row_scale[m]``."""
    x = dequantize_rows_int8(codes, scale, weight.k)
    w = weight.dequantized(torch.float32)
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if row_expert is None else row_expert.long()
    y = x.new_zeros(x.shape[0], weight.n)
    for e in idx.unique().tolist():  # expert by expert: no [M, N, K] gather
        rows = idx == e
        y[rows] = x[rows] @ w[e].t()
    y = y if bias is None else y + bias.float()
    return y if row_scale is None else y * row_scale.float()[:, None]


# ---- activation quantization ----------------------------------------------------------------------------------------
@jit
def int8_row_scale(amax):
    """``(scale, 1 / scale)`` of a row whose largest magnitude is ``amax`` (float32): ``amax / 127`` (1 for an
    all-zero row) and its reciprocal, each correctly rounded (``div_rn``, as the twin's; CUDA's "/" is not)."""
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1.0)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    return scale, inv


@jit
def int8_codes(x, inv, CUDA: tl.constexpr):
    """``floor(x * inv + 1/2)`` clamped to [-127, 127], as float32 (``x`` float32): the row quantizer's codes, the
    arithmetic of :func:`quantize_rows_int8_ref`. Shared by every kernel that writes them (this module's quantizer,
    :func:`qmamba.kernels.fused_moe.route_top1_int8`, :func:`qmamba.kernels.decode_step.add_norm`), so that they
    agree bit for bit."""
    if CUDA:  # a product the compiler may not fuse with the add (mul.rn): one rounding, then the add's, as the twin
        q = tl.floor(libdevice.mul_rn(x, inv) + 0.5)
    else:
        q = tl.floor(x * inv + 0.5)
    return tl.minimum(tl.maximum(q, -127.0), 127.0)


@jit
def plane_byte_inputs(j):
    """The input column k that column ``j`` of the codes holds (:func:`qmamba.quant.layout.int8_x_plane_order`):
    tile ``j // 128``, half ``(j % 128) // 64`` (low / high nibbles), byte ``r = j % 64``."""
    r = j % 64
    return (j // 128) * 128 + 32 * (r % 4) + r // 4 + 16 * ((j % 128) // 64)


@jit
def plane_byte_columns(k):
    """The inverse of :func:`plane_byte_inputs`: the column of the codes that holds input ``k`` (tile ``k // 128``,
    half ``h = (k // 16) % 2``, byte ``4 (k % 16) + (k % 128) // 32``)."""
    kk = k % 128
    return k - kk + 64 * ((kk // 16) % 2) + 4 * (kk % 16) + kk // 32


@jit
def quantize_row_int8(x_row, sxk, K, q_row, s_at, sum_row, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                      CUDA: tl.constexpr):
    """One row ``x_row[k * sxk]`` (``k < K``) quantized as :func:`quantize_rows_int8_ref` does: its codes in
    plane-byte order into ``q_row`` (``TILES`` 128-column tiles), its scale into ``s_at``, each tile's code sum into
    ``sum_row``."""
    j = tl.arange(0, BLOCK_K)
    k = plane_byte_inputs(j)  # column j of the output holds input k
    x = tl.load(x_row + k * sxk, mask=k < K, other=0.0).to(tl.float32)
    scale, inv = int8_row_scale(tl.max(tl.abs(x), axis=0))
    q = int8_codes(x, inv, CUDA)
    tl.store(q_row + j, q.to(tl.int8), mask=j < TILES * 128)
    tl.store(s_at, scale)
    t = tl.arange(0, BLOCK_K // 128)
    sums = tl.sum(tl.reshape(q, (BLOCK_K // 128, 128)), axis=1)
    tl.store(sum_row + t, sums, mask=t < TILES)  # (the padding columns are zeroed by the launcher)


@jit
def _quantize_rows_int8_kernel(x_ptr, q_ptr, s_ptr, sum_ptr, K, sxm, sxk, sqm, ssum, BLOCK_K: tl.constexpr,
                               TILES: tl.constexpr, CUDA: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # a programmatic dependent launch: x comes from the kernel before
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    quantize_row_int8(x_ptr + row * sxm, sxk, K, q_ptr + row * sqm, s_ptr + row, sum_ptr + row * ssum, BLOCK_K,
                      TILES, CUDA)


def check_int8_k_pad(who: str, x: torch.Tensor, k_pad: int):
    """Refuse an input ``x`` that is not ``[M, K]`` with ``K <= k_pad``, ``k_pad`` a multiple of 128."""
    if x.dim() != 2 or k_pad % INT4_TILE or k_pad < x.shape[1]:
        raise ValueError(f"{who}: x must be [M, K] with K <= k_pad, k_pad a multiple of {INT4_TILE}")


def int8_rows_buffers(rows: int, k_pad: int, device) -> tuple:
    """Buffers for :func:`quantize_rows_int8`'s output (and every kernel that writes it in its place) of ``rows`` rows
    of ``k_pad`` code columns: int8 codes (zeros), float32 scales (ones) and the tile sums, zeros (their padding
    columns are never written)."""
    return (torch.zeros(rows, k_pad, dtype=torch.int8, device=device),
            torch.ones(rows, dtype=torch.float32, device=device),
            torch.zeros(rows, sum_columns(k_pad), dtype=torch.float32, device=device))


def quantize_rows_int8(x: torch.Tensor, k_pad: int, out=None, pdl: bool = False):
    """Triton twin of :func:`quantize_rows_int8_ref` (one program a row): ``(codes, scale, sums)``. ``out``: those
    three preallocated (the sums' columns past ``k_pad / 128`` zeroed once: never written); ``pdl`` (Hopper and newer,
    inside a CUDA graph): a programmatic dependent launch."""
    check_int8_k_pad("quantize_rows_int8", x, k_pad)
    m = x.shape[0]
    tiles = k_pad // INT4_TILE
    if out is None:
        out = int8_rows_buffers(m, k_pad, x.device)
    codes, scale, sums = out
    if codes.shape != (m, k_pad) or codes.dtype != torch.int8 or scale.shape != (m,) or \
            sums.shape != (m, sum_columns(k_pad)) or scale.dtype != torch.float32 or sums.dtype != torch.float32:
        raise ValueError(f"quantize_rows_int8: out must be int8 codes [{m}, {k_pad}], float32 scale [{m}] and sums "
                         f"[{m}, {sum_columns(k_pad)}]")
    if m:
        _quantize_rows_int8_kernel[(m,)](x, codes, scale, sums, x.shape[1], x.stride(0), x.stride(1), codes.stride(0),
                                         sums.stride(0), BLOCK_K=next_pow2(k_pad), TILES=tiles, CUDA=x.is_cuda,
                                         PDL=pdl, num_warps=4, **pdl_launch(pdl))
    return codes, scale, sums


# ---- the GEMM -------------------------------------------------------------------------------------------------------
@jit
def _nibble_bytes(wb, HIGH: tl.constexpr, ASM: tl.constexpr):
    """The low (or ``HIGH``) nibbles of bytes ``wb`` (uint8) as int8 codes: on CUDA four bytes a 32-bit mask (and a
    shift), elsewhere (the interpreter has no inline PTX) one element at a time."""
    if ASM:
        if HIGH:
            codes = tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
                                              "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        else:
            codes = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [wb], dtype=tl.int8,
                                              is_pure=True, pack=4)
    else:
        if HIGH:
            codes = (wb >> 4).to(tl.int8)
        else:
            codes = (wb & 0xF).to(tl.int8)
    return codes


@jit
def _as_float(part, MAGIC: tl.constexpr):
    """int32 ``part`` as float32. ``MAGIC`` (|part| < 2^22): the int added to the bits of 1.5 * 2^23 is a float
    exactly that much larger, minus 1.5 * 2^23 (two full-rate instructions instead of ``I2FP``)."""
    if MAGIC:
        f = (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        f = part.to(tl.float32)
    return f


@jit
def _w4a8_gemm_kernel(
    q_ptr, xs_ptr, xsum_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
    sorted_ptr, M, N, K_PAD, GRID_M, GRID_N, sqm, ssum, som, son, swe, swn, sse, ssn, sze, szn,
    TILES: tl.constexpr, GROUP: tl.constexpr, SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr,
    ASM: tl.constexpr, PRECISION: tl.constexpr, MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SWIZZLE: tl.constexpr, GATE: tl.constexpr, W_LEFT: tl.constexpr,
):
    """``GATE`` (an activation id, or -1): a gated fc1, N = 2F weight rows, a tile's gate rows then their up rows, as
    ``GATE`` of :func:`qmamba.kernels.dequant_gemm._dequant_gemm_kernel`; the epilogue writes ``act(gate) * up``.
    ``W_LEFT``: the transposed product ``W x^T`` (the weight's codes the left operand, read by the tensor cores from
    registers: no shared-memory copy of the unpacked tile), transposed back once after the K loop."""
    pid_m, pid_n = swizzled_program(tl.program_id(0), GRID_M, GRID_N, SWIZZLE)
    rows, row_ok, expert = program_rows(pid_m, M, xs_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, sorted_ptr,
                                        2 if TILES else 0, BLOCK_M)  # ROUTE_TILES / ROUTE_DENSE
    k_end = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, K_PAD, 0)  # an empty tile (the map's spares): no loop
    e64 = expert.to(tl.int64)
    rows64 = rows.to(tl.int64)
    n, n_ok = weight_rows(pid_n, N, BLOCK_N, GATE)
    jb = tl.arange(0, 64)
    w_rows = w_ptr + e64 * swe + n[:, None] * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # W_LEFT's accumulator
    for k0 in range(0, k_end, 128):
        # the tile's 64 bytes a weight row: low nibbles are the codes of input columns k0 .. k0 + 63 (plane-byte
        # order), high nibbles those of k0 + 64 .. k0 + 127
        wb = tl.load(w_rows + (k0 // 2 + jb)[None, :], mask=n_ok[:, None], other=0)
        x_lo = tl.load(q_ptr + rows64[:, None] * sqm + (k0 + jb)[None, :], mask=row_ok[:, None], other=0)
        x_hi = tl.load(q_ptr + rows64[:, None] * sqm + (k0 + 64 + jb)[None, :], mask=row_ok[:, None], other=0)
        scale = tl.load(s_ptr + e64 * sse + n * ssn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
        if W_LEFT:  # the weight's codes the dot's left operand, which the tensor cores read from registers
            part_t = tl.dot(_nibble_bytes(wb, False, ASM), tl.trans(x_lo), out_dtype=tl.int32)
            part_t = tl.dot(_nibble_bytes(wb, True, ASM), tl.trans(x_hi), part_t, out_dtype=tl.int32)
            acc_t += _as_float(part_t, MAGIC) * scale[:, None]
        else:
            part = tl.dot(x_lo, tl.trans(_nibble_bytes(wb, False, ASM)), out_dtype=tl.int32)
            part = tl.dot(x_hi, tl.trans(_nibble_bytes(wb, True, ASM)), part, out_dtype=tl.int32)
            acc += _as_float(part, MAGIC) * scale[None, :]
    if W_LEFT:
        acc = tl.trans(acc_t)
    # the zero points: acc -= sum over tiles t of sum(x codes of t) * scale_t * zero_t (the tile's group's)
    t = tl.arange(0, SUMS)
    blk = (t * 128) // GROUP
    zm = n_ok[:, None] & (t < K_PAD // 128)[None, :]
    zs = tl.load(s_ptr + e64 * sse + n[:, None] * ssn + blk[None, :], mask=zm, other=0.0).to(tl.float32)
    zb = tl.load(z_ptr + e64 * sze + n[:, None] * szn + (blk // 2)[None, :], mask=zm, other=0).to(tl.int32)
    zs *= ((zb >> ((blk % 2) * 4)[None, :]) & 0xF).to(tl.float32)
    xsum = tl.load(xsum_ptr + rows64[:, None] * ssum + t[None, :], mask=row_ok[:, None], other=0.0)
    acc -= tl.dot(xsum, tl.trans(zs), input_precision=PRECISION)
    acc *= tl.load(xs_ptr + rows64, mask=row_ok, other=0.0)[:, None]
    if GATE >= 0:
        gated_epilogue(acc, out_ptr, s_ptr, bias_ptr, rscale_ptr, rows64, row_ok, n, n_ok, e64, pid_n, N // 2, som,
                       son, sse, ssn, 0, HAS_BIAS, HAS_RSCALE, GATE, BLOCK_N)  # (FMT 0: no int8 row scale)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RSCALE:
            acc *= tl.load(rscale_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rows64[:, None] * som + n[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def w4a8_operands(who: str, codes, sums, weight: PackedWeight, out, gate: str | None, block_n: int,
                  out_dtype=torch.bfloat16):
    """The W4A8 kernels' shared checks of :func:`quantize_rows_int8`'s ``codes`` (contiguous int8 ``[M, k_pad]``)
    and ``sums`` against int4 plane words (group size a multiple of 128; ``gate``: a gated fc1, even N and
    ``block_n``); returns ``out``, ``[M, N]`` (``gate``: ``[M, N / 2]``), a new ``out_dtype`` tensor when None."""
    if weight.fmt != FMT_INT4_PLANES or weight.group_size % INT4_TILE:
        raise ValueError(f"{who}: the weight must be int4 plane words with a group size a multiple of 128")
    m, k_pad = codes.shape
    if k_pad != weight.qweight.shape[-1] * 8 or codes.dtype != torch.int8 or not codes.is_contiguous():
        raise ValueError(f"{who}: codes must be contiguous [M, {weight.qweight.shape[-1] * 8}] int8, got "
                         f"{tuple(codes.shape)} {codes.dtype}")
    if tuple(sums.shape) != (m, sum_columns(k_pad)) or sums.dtype != torch.float32:
        raise ValueError(f"{who}: sums must be [{m}, {sum_columns(k_pad)}] float32")
    if gate is not None and (weight.n % 2 or block_n % 2):
        raise ValueError(f"{who}: a gated epilogue needs an even N and block_n")
    n_out = weight.n // 2 if gate is not None else weight.n
    if out is None:
        out = torch.empty(m, n_out, dtype=out_dtype, device=codes.device)
    if tuple(out.shape) != (m, n_out):
        raise ValueError(f"{who}: out must be [{m}, {n_out}], got {tuple(out.shape)}")
    return out


def w4a8_gemm(codes, scale, sums, weight: PackedWeight, out=None, bias=None, row_scale=None,
              tiles: ExpertTiles | None = None, block_m: int = 64, block_n: int = 128, num_warps: int = 4,
              num_stages: int = 3, magic: bool = False, gate: str | None = None, weight_left: bool = False,
              out_dtype=torch.bfloat16) -> torch.Tensor:
    """``out [M, N] <- (x_hat @ W_hat^T + bias) * row_scale`` from :func:`quantize_rows_int8`'s ``codes, scale,
    sums`` and int4 plane words (group size a multiple of 128); one matrix, or with ``tiles`` the routed expert
    tiles of a stack (``tiles.block_m`` rows a tile, which must be ``block_m``). ``out`` defaults to a new
    ``out_dtype`` tensor. ``magic``: each tile's int32 product converted to float by an add to the bits of 1.5 * 2^23 and a float
    subtraction (two full-rate instructions) instead of ``I2FP`` (one, of a throughput to be measured). ``gate`` (an
    activation of :data:`qmamba.kernels.activations.ACTIVATION_IDS`): the weight is a gated fc1 (2F rows: gate, then
    up) and ``out [M, F]`` receives ``act(gate) * up`` (then times ``row_scale``), computed in the epilogue.
    ``weight_left``: the product taken as ``W x^T`` (``W_LEFT`` of the kernel)."""
    out = w4a8_operands("w4a8_gemm", codes, sums, weight, out, gate, block_n, out_dtype)
    if tiles is None and weight.n_experts != 1:
        raise ValueError("w4a8_gemm: an expert stack needs its tile map")
    if tiles is not None and tiles.block_m != block_m:
        raise ValueError(f"w4a8_gemm: the tile map has {tiles.block_m} rows a tile, the kernel {block_m}")
    m, k_pad = codes.shape
    n_out = out.shape[1]
    if m == 0:
        return out
    wb = weight.qweight.view(torch.uint8)  # [E, N, 4 W] bytes of the plane words
    s, z = weight.scales, weight.zeros
    grid_m = tiles.n_tiles if tiles is not None else cdiv(m, block_m)
    grid_n = cdiv(n_out, block_n // 2) if gate is not None else cdiv(weight.n, block_n)
    dummy = scale
    _w4a8_gemm_kernel[(grid_m * grid_n,)](
        codes, scale, sums, out, wb, s, z, bias if bias is not None else dummy,
        row_scale if row_scale is not None else dummy,
        *(tiles.tensors() if tiles is not None else (dummy, dummy, dummy, dummy)),
        m, weight.n, k_pad, grid_m, grid_n, codes.stride(0), sums.stride(0), out.stride(0), out.stride(1),
        wb.stride(0), wb.stride(1), s.stride(0), s.stride(1), z.stride(0), z.stride(1),
        TILES=tiles is not None, GROUP=weight.group_size, SUMS=sums.shape[1], HAS_BIAS=bias is not None,
        HAS_RSCALE=row_scale is not None, ASM=codes.is_cuda, PRECISION="tf32x3" if codes.is_cuda else "ieee",
        MAGIC=magic, BLOCK_M=block_m, BLOCK_N=block_n, SWIZZLE=1 if tiles is not None else 8,
        GATE=-1 if gate is None else ACTIVATION_IDS[gate], W_LEFT=weight_left, num_warps=num_warps,
        num_stages=num_stages)
    return out


def check_x_int8(who: str, x: torch.Tensor, x_int8):
    """Refuse a pre-quantized input ``x_int8 = (codes, scale, sums)`` of ``x [M, K]`` that is not
    :func:`quantize_rows_int8`'s for it (:func:`check_int8_operands`) or not on x's device; the codes' width against
    the weight is :func:`w4a8_operands`' check."""
    check_int8_operands(who, x_int8, x.shape[0], x.shape[1])
    if any(t.device != x.device for t in x_int8):
        raise ValueError(f"{who}: x_int8 must be on x's device {x.device}")


def w4a8_linear(x, weight: PackedWeight, bias=None, row_expert=None, row_scale=None, tiles: ExpertTiles | None = None,
                gate: str | None = None, tile: tuple = (64, 128, 4, 3, False), x_int8=None) -> torch.Tensor:
    """``x [M, K]`` -> ``[M, N]`` (``gate``: ``[M, N / 2]``, see :func:`w4a8_gemm`) in x.dtype: the activation
    quantized per row (:func:`quantize_rows_int8`; or given already so, ``x_int8 = (codes, scale, sums)``, as the
    MoE's routing kernel writes them: :func:`qmamba.kernels.fused_moe.route_top1_int8`), then :func:`w4a8_gemm` on
    ``tile`` = ``(block_m, block_n, warps, stages, weight_left)`` (routed rows: ``row_expert`` with its ``tiles``,
    built here at ``block_m`` rows a tile when not given; given, theirs). The matmul entry point's W4A8 path
    (``MatmulPolicy.w4a8_min_m``, ``w4a8_tile``)."""
    block_m, block_n, warps, stages, left = tile
    if x_int8 is not None:
        check_x_int8("w4a8_linear", x, x_int8)  # (the codes' width and type: w4a8_gemm's checks)
    if row_expert is not None and tiles is None:
        tiles = expert_tile_map(row_expert, weight.n_experts, block_m)
    codes, scale, sums = x_int8 if x_int8 is not None else quantize_rows_int8(x, weight.qweight.shape[-1] * 8)
    return w4a8_gemm(codes, scale, sums, weight, bias=bias, row_scale=row_scale, tiles=tiles,
                     block_m=tiles.block_m if tiles is not None else block_m, block_n=block_n, num_warps=warps,
                     num_stages=stages, gate=gate, weight_left=left, out_dtype=x.dtype)
