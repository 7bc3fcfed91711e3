"""Packed weight layouts: defined once here, shared by the runtime modules, the Triton kernels and the ONNX export.

A weight ``W [N, K]`` (out_features x in_features, as ``nn.Linear``) is stored as follows. Stacked experts add a
leading ``E`` dimension to every tensor.

int8 ("int8", per-output-channel symmetric)
    qweight  int8    [N, K]        q in [-127, 127]
    scales   fp16    [N]           W[n, k] = q[n, k] * scales[n]

int4 ("int4", group-wise along K; ONNX Runtime ``MatMulNBits`` layout, so export copies it unchanged)
    qweight  uint8   [N, n_blocks, group_size // 2]   two 4-bit values per byte, LOW nibble = even k
    scales   fp16    [N, n_blocks]
    zeros    uint8   [N, ceil(n_blocks / 2)]          4-bit zero points, two per byte, LOW nibble = even block
    W[n, k] = (q[n, k] - zero[n, k // g]) * scale[n, k // g]
    K is padded up to ``n_blocks * group_size``: padded weights are stored as q = zero point, i.e. exactly 0,
    so a kernel may read the padded tail against zero activations. Symmetric int4 uses zero point 8 everywhere.

The functions below convert between integer codes (``q`` as uint8/int8 tensors, one value per element) and
the packed tensors. They know nothing about models. The 1-bit "binary" layout is documented in its section below.
"""

from __future__ import annotations

import math

import torch

INT4_GROUP_SIZES = (16, 32, 64, 128, 256)


class LayoutError(ValueError):
    """Packed tensors whose shapes or dtypes do not match the layout."""


def int4_num_blocks(k: int, group_size: int) -> int:
    if group_size not in INT4_GROUP_SIZES:
        raise LayoutError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    return math.ceil(k / group_size)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last dim (even length): ``[..., 2m] uint8 -> [..., m] uint8``, low nibble first."""
    if q.shape[-1] % 2:
        raise LayoutError(f"cannot pack an odd number ({q.shape[-1]}) of 4-bit values")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., m] uint8 -> [..., 2m] uint8``."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> dict:
    """Integer codes ``q [..., N, K]`` (0..15), ``scales/zeros [..., N, n_blocks]`` -> packed int4 tensors."""
    *lead, n, k = q.shape
    n_blocks = int4_num_blocks(k, group_size)
    if tuple(scales.shape) != (*lead, n, n_blocks) or tuple(zeros.shape) != (*lead, n, n_blocks):
        raise LayoutError(f"scales/zeros must be {(*lead, n, n_blocks)}, got {tuple(scales.shape)} and "
                          f"{tuple(zeros.shape)}")
    k_pad = n_blocks * group_size
    if k_pad != k:  # pad with the zero point: dequantizes to exactly 0
        pad_codes = zeros[..., -1:].to(torch.uint8).expand(*lead, n, k_pad - k)
        q = torch.cat([q.to(torch.uint8), pad_codes], dim=-1)
    qweight = pack_nibbles(q).reshape(*lead, n, n_blocks, group_size // 2)
    z = zeros.to(torch.uint8)
    if n_blocks % 2:
        z = torch.cat([z, torch.zeros_like(z[..., :1])], dim=-1)
    return {"qweight": qweight.contiguous(), "scales": scales.to(torch.float16).contiguous(),
            "zeros": pack_nibbles(z).contiguous()}


def unpack_int4(qweight: torch.Tensor, zeros: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 -> ``(q [..., N, K] uint8, zeros [..., N, n_blocks] uint8)``."""
    *lead, n, n_blocks, half = qweight.shape
    q = unpack_nibbles(qweight.reshape(*lead, n, n_blocks * half))[..., :k]
    z = unpack_nibbles(zeros)[..., :n_blocks]
    return q, z


def dequantize_int4(qweight, scales, zeros, k: int, dtype=torch.float32) -> torch.Tensor:
    """Packed int4 -> dense ``W [..., N, K]``."""
    group_size = qweight.shape[-1] * 2
    q, z = unpack_int4(qweight, zeros, k)
    z_full = z.repeat_interleave(group_size, dim=-1)[..., :k]
    s_full = scales.float().repeat_interleave(group_size, dim=-1)[..., :k]
    return ((q.float() - z_full.float()) * s_full).to(dtype)


# ---- int4 "planes": the decode kernels' view of the same codes ----------------------------------------------------
# K is cut into tiles of INT4_TILE = 128 elements, each held in INT4_TILE_WORDS = 16 int32 words; bits 4i..4i+3 of
# word w of tile t hold the code of element k = 128 t + 16 i + w (i = 0..7). One nibble position over a tile's 16
# words is then 16 consecutive k, so a kernel reads the input for it as one contiguous run. Scales and zero points
# stay in the int4 layout above ([N, n_blocks]; a group of >= 16 elements never splits a 16-element run). The tail
# past the stored K (tile padding) holds code 0 and must be read against zero input.
INT4_TILE, INT4_TILE_WORDS = 128, 16


def int4_to_planes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """int4 bytes ``[..., N, n_blocks, g/2]`` -> plane words ``[..., N, n_tiles * 16]`` int32 (``n_tiles =
    ceil(k_pad / 128)``, ``k_pad`` the group-padded K, whose codes are all kept)."""
    *lead, n, n_blocks, half = qweight.shape
    k_pad = n_blocks * half * 2
    if k > k_pad:
        raise LayoutError(f"int4 planes: K {k} is longer than the packed rows ({k_pad})")
    codes = unpack_nibbles(qweight.reshape(*lead, n, n_blocks * half)).to(torch.int64)      # [..., N, k_pad]
    tiles = math.ceil(k_pad / INT4_TILE)
    codes = torch.nn.functional.pad(codes, (0, tiles * INT4_TILE - k_pad))
    codes = codes.reshape(*lead, n, tiles, 8, INT4_TILE_WORDS).transpose(-1, -2)            # [..., t, w, i]
    shifts = 4 * torch.arange(8, device=codes.device, dtype=torch.int64)
    words = (codes << shifts).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).reshape(*lead, n, tiles * INT4_TILE_WORDS).contiguous()


# The input side of a plane-word GEMV at one row, prepared once per token by its producer ("input planes",
# ``[..., INT4_X_PLANES, width]`` fp32, width = a power-of-two number of tiles, which a kernel's padded tile row
# never passes, so it reads them unmasked): row i < 8 holds x[k] * 2^(96 - 4p), p = i for i < 5 and
# i - 5 above (the position of nibble i in the word the kernel masks it from: bits 4i of w, or of w >> 20), so that
# a nibble masked in place and read as a float (code * 2^(4p - 149), a subnormal) times its input is
# code * x * 2^-53 for every i with no conversion or scaling in the kernel; row 8 holds, at word index 16 t + w,
# 2^-53 * sum over i of x[128 t + 16 i + w] (the word's input sum, for the zero point). Padding is 0.
INT4_X_PLANES = 9


def int4_x_plane_scale(i: int) -> float:
    """The power of two input plane ``i`` (< 8) multiplies ``x`` by."""
    return 2.0 ** (96 - 4 * (i if i < 5 else i - 5))


def int4_x_planes_width(k: int) -> int:
    """Columns of each input plane for an input of ``k`` elements: a power-of-two number of 128-element tiles."""
    tiles = math.ceil(k / INT4_TILE)
    return (1 << (tiles - 1).bit_length()) * INT4_TILE


def check_x_planes(who: str, name: str, planes: torch.Tensor, rows: int, k: int) -> int:
    """Raise ``ValueError`` unless ``planes`` is a row-contiguous ``[rows, 9, width]`` float32 tensor of input planes
    for ``k`` elements; returns the width (:func:`int4_x_planes_width`)."""
    width = int4_x_planes_width(k)
    if tuple(planes.shape) != (rows, INT4_X_PLANES, width) or planes.dtype != torch.float32 or \
            planes.stride(2) != 1 or planes.stride(1) != width:
        raise ValueError(f"{who}: {name} must be a row-contiguous [{rows}, {INT4_X_PLANES}, {width}] float32 tensor, "
                         f"got {tuple(planes.shape)} {planes.dtype}")
    return width


def check_word_sums(who: str, name: str, sums: torch.Tensor, rows: int, width: int):
    """Raise ``ValueError`` unless ``sums`` is a row-contiguous ``[rows, width / 8]`` float32 tensor: the word sums
    (plane 8's values) of input planes ``width`` columns wide, kept in a row of their own."""
    if tuple(sums.shape) != (rows, width // 8) or sums.dtype != torch.float32 or sums.stride(1) != 1:
        raise ValueError(f"{who}: {name} must be a row-contiguous [{rows}, {width // 8}] float32 tensor, got "
                         f"{tuple(sums.shape)} {sums.dtype}")


def int4_x_planes(x: torch.Tensor) -> torch.Tensor:
    """Reference: ``x [..., K]`` -> input planes ``[..., 9, int4_x_planes_width(K)]`` fp32 (see above)."""
    k = x.shape[-1]
    tiles = int4_x_planes_width(k) // INT4_TILE
    xf = torch.nn.functional.pad(x.float(), (0, tiles * INT4_TILE - k))
    out = torch.zeros(*x.shape[:-1], INT4_X_PLANES, tiles * INT4_TILE, device=x.device, dtype=torch.float32)
    for i in range(8):
        out[..., i, :] = xf * int4_x_plane_scale(i)
    sums = xf.reshape(*x.shape[:-1], tiles, 8, INT4_TILE_WORDS).sum(-2)                    # [..., t, w]
    out[..., 8, :tiles * INT4_TILE_WORDS] = sums.reshape(*x.shape[:-1], -1) * 2.0 ** -53
    return out


def int8_x_plane_order(k_pad: int) -> torch.Tensor:
    """The int8 activations of the W4A8 GEMM (:mod:`qmamba.kernels.w4a8_gemm`) in plane-byte order: ``[k_pad]``
    int64, entry j the input element k stored at column j. Read as bytes, a tile's 16 plane words are 64 bytes; byte
    ``4 w + c`` holds nibble ``2 c`` (low: k = 128 t + 32 c + w) and nibble ``2 c + 1`` (high: k + 16). Columns 0..63
    of tile t are the low nibbles' k in byte order, columns 64..127 the high nibbles', so that a tile's bytes masked
    (low) or shifted (high) are the codes of two contiguous 64-column runs of the input: no shuffle of either."""
    tiles = math.ceil(k_pad / INT4_TILE)
    j = torch.arange(INT4_TILE // 2)
    low = 32 * (j % 4) + j // 4
    tile = torch.cat([low, low + 16])
    return (torch.arange(tiles)[:, None] * INT4_TILE + tile[None, :]).reshape(-1)


def int4_from_planes(words: torch.Tensor, n_blocks: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`int4_to_planes`: plane words -> int4 bytes ``[..., N, n_blocks, group_size / 2]``."""
    *lead, n, n_words = words.shape
    tiles = n_words // INT4_TILE_WORDS
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int64)
    codes = (words.to(torch.int64)[..., None] >> shifts) & 0xF                             # [..., N, t*16, i]
    codes = codes.reshape(*lead, n, tiles, INT4_TILE_WORDS, 8).transpose(-1, -2)
    codes = codes.reshape(*lead, n, tiles * INT4_TILE)[..., :n_blocks * group_size]
    return pack_nibbles(codes.to(torch.uint8)).reshape(*lead, n, n_blocks, group_size // 2).contiguous()


def dequantize_int8(qweight, scales, dtype=torch.float32) -> torch.Tensor:
    """Packed int8 -> dense ``W [..., N, K]``."""
    return (qweight.float() * scales.float()[..., None]).to(dtype)


def check_int4(qweight, scales, zeros, n: int, k: int, group_size: int, lead: tuple = ()) -> None:
    n_blocks = int4_num_blocks(k, group_size)
    want = {"qweight": ((*lead, n, n_blocks, group_size // 2), torch.uint8),
            "scales": ((*lead, n, n_blocks), torch.float16),
            "zeros": ((*lead, n, (n_blocks + 1) // 2), torch.uint8)}
    for name, tensor in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        shape, dtype = want[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise LayoutError(f"int4 {name}: expected {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")


def check_int4_planes(words, scales, zeros, n: int, k: int, group_size: int) -> None:
    """Plane words ``[..., N, n_tiles * 16]`` int32 beside the stored scales and zero points of the same leading
    shape; the group size a multiple of the tile (a group never splits a tile)."""
    if group_size % INT4_TILE:
        raise LayoutError(f"int4 planes: group size {group_size} is not a multiple of {INT4_TILE}")
    lead = tuple(scales.shape[:-2])
    n_blocks = int4_num_blocks(k, group_size)
    want = {"qweight": ((*lead, n, n_blocks * group_size // INT4_TILE * INT4_TILE_WORDS), torch.int32),
            "scales": ((*lead, n, n_blocks), torch.float16), "zeros": ((*lead, n, (n_blocks + 1) // 2), torch.uint8)}
    for name, tensor in (("qweight", words), ("scales", scales), ("zeros", zeros)):
        shape, dtype = want[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise LayoutError(f"int4 planes {name}: expected {shape} {dtype}, got {tuple(tensor.shape)} "
                              f"{tensor.dtype}")


def check_int8(qweight, scales, n: int, k: int, lead: tuple = ()) -> None:
    if tuple(qweight.shape) != (*lead, n, k) or qweight.dtype != torch.int8:
        raise LayoutError(f"int8 qweight: expected {(*lead, n, k)} int8, got {tuple(qweight.shape)} {qweight.dtype}")
    if tuple(scales.shape) != (*lead, n) or scales.dtype != torch.float16:
        raise LayoutError(f"int8 scales: expected {(*lead, n)} float16, got {tuple(scales.shape)} {scales.dtype}")


# ---- binary (1 bit per weight, Bi-Mamba form) ---------------------------------------------------------------------
# binary ("binary"): W_hat[n, k] = alpha[k] * s[n, k] + beta[k]      (s = +1 / -1; alpha, beta per INPUT column)
#     qweight    uint8  [N, ceil(K / 8)]   sign bits, 8 per byte along K: bit j (LSB = j 0) of byte b is column
#                                          k = 8 b + j; bit 1 = +1, bit 0 = -1. sign(0) is defined as +1. The bits of
#                                          the padded tail (k >= K) are 0 and mean nothing: readers mask them.
#     alpha      fp16   [K]                column scale (>= 0)
#     beta       fp16   [K]                column offset
#     row_scale  fp16   [N]                only in the per-output-row variant ("row_scale": true):
#                                          W_hat[n, k] = row_scale[n] * (alpha[k] * s[n, k] + beta[k])
# Stacked experts add a leading E to every tensor. A matmul never needs W_hat:
#     x @ W_hat^T = ((x * alpha) @ S^T + (x . beta)) (* row_scale)    S = the +/-1 matrix [N, K]
BINARY_BYTE_BITS = 8


def binary_num_bytes(k: int) -> int:
    """Bytes per row of packed signs for ``k`` input columns."""
    return math.ceil(k / BINARY_BYTE_BITS)


def binary_signs(W: torch.Tensor) -> torch.Tensor:
    """Sign bits of ``W`` (uint8 0/1, same shape): 1 where ``W >= 0`` (so sign(0) = +1), 0 where ``W < 0``."""
    return (W >= 0).to(torch.uint8)


def pack_signs(bits: torch.Tensor) -> torch.Tensor:
    """Sign bits ``[..., K]`` (0/1) -> ``[..., ceil(K/8)] uint8``, bit j of byte b = element 8 b + j."""
    k = bits.shape[-1]
    k_pad = binary_num_bytes(k) * BINARY_BYTE_BITS
    b = bits.to(torch.uint8)
    if bits.numel() and int(b.max()) > 1:
        raise LayoutError("sign bits must be 0 or 1")
    if k_pad != k:
        b = torch.nn.functional.pad(b, (0, k_pad - k))
    b = b.reshape(*b.shape[:-1], k_pad // BINARY_BYTE_BITS, BINARY_BYTE_BITS)
    weights = (1 << torch.arange(BINARY_BYTE_BITS, device=b.device, dtype=torch.int32)).to(torch.uint8)
    return (b * weights).sum(-1, dtype=torch.int32).to(torch.uint8).contiguous()


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``[..., ceil(K/8)] uint8`` -> bits ``[..., K]`` uint8 (0/1)."""
    shifts = torch.arange(BINARY_BYTE_BITS, device=packed.device, dtype=torch.uint8)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * BINARY_BYTE_BITS)[..., :k]


def signs_pm1(packed: torch.Tensor, k: int, dtype=torch.float32) -> torch.Tensor:
    """Packed signs -> the +/-1 matrix ``S [..., N, K]`` in ``dtype``."""
    return unpack_signs(packed, k).to(dtype) * 2 - 1


def dequantize_binary(qweight, alpha, beta, k: int, row_scale=None, dtype=torch.float32) -> torch.Tensor:
    """Packed binary -> dense ``W_hat [..., N, K]`` (computed in float32, then cast)."""
    S = signs_pm1(qweight, k)
    W = S * alpha.float()[..., None, :] + beta.float()[..., None, :]
    if row_scale is not None:
        W = W * row_scale.float()[..., :, None]
    return W.to(dtype)


# The 1-bit decode kernel's "denorm" reading (qmamba.kernels.decode_linear with DecodePolicy.int4_unpack "denorm"):
# bit t of a sign word, masked in place (bits 16..31 from the word shifted down by 16, so t' = t mod 16 < 23) and
# read as a float, is the subnormal b * 2^(t' - 149); times x * alpha * 2^(96 - t') it is b * x * alpha * 2^-53
# exactly. With s = 2 b - 1:
#     x @ W_hat^T = 2^54 * sum_k x_k * alpha_denorm_k * [bit k as a float]  +  x . gamma,
#     alpha_denorm = alpha * 2^(96 - k mod 16) (fp32), gamma = beta - alpha (fp32)
# (needs |x * alpha| < 2^31 and subnormals kept, as Triton's fp32 arithmetic does).
BINARY_DENORM_HALF = 16  # bits per half word: the denorm reading's bit positions t' = k mod 16
BINARY_DENORM_SUM_SCALE = 2.0 ** 54


def binary_denorm_vectors(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_denorm, gamma)`` fp32 ``[..., K]`` of a 1-bit weight's ``alpha`` / ``beta`` (see above)."""
    t = torch.arange(alpha.shape[-1], device=alpha.device) % BINARY_DENORM_HALF
    a = alpha.float() * torch.exp2((96 - t).float())
    return a.contiguous(), (beta.float() - alpha.float()).contiguous()


def check_binary(qweight, alpha, beta, n: int, k: int, row_scale=None, lead: tuple = (),
                 has_row_scale: bool = False) -> None:
    want = [("qweight", qweight, (*lead, n, binary_num_bytes(k)), torch.uint8),
            ("alpha", alpha, (*lead, k), torch.float16), ("beta", beta, (*lead, k), torch.float16)]
    if has_row_scale:
        want.append(("row_scale", row_scale, (*lead, n), torch.float16))
    for name, tensor, shape, dtype in want:
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise LayoutError(f"binary {name}: expected {shape} {dtype}, got {got}")
