"""``binary``: 1 bit per weight (Bi-Mamba form), ``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` (``* r[n]`` in the
``row_scale`` variant), signs bit-packed 8 per byte ("binary" section of :mod:`qmamba.quant.layout`); params by
post-training binarization (:mod:`qmamba.quant.binarize`). Reference matmul in the factored form (``W_hat`` is
never built), kernel record :class:`qmamba.kernels.weights.BinaryWeight`, ONNX form an exact 2-bit
``MatMulNBits`` on ``x * alpha`` plus ``x @ beta``. :mod:`qmamba.quant.binary` names every 1-bit piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmamba.quant import layout
from qmamba.quant.binarize import ptb, reconstruct, signs_for
from qmamba.quant.formats.base import MatMulNBitsForm, WeightFormat, matmul_nbits_block, register_format


@register_format("binary")
@dataclass(frozen=True)
class BinaryFormat(WeightFormat):
    """1 bit per weight: ``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` (``row_scale``: times ``r[n]``), ``s = +/-1``
    bit-packed 8 per byte, ``alpha``/``beta`` fp16 per input column. Grouped protocol: ``params(W) -> (ab [..., 2,
    K] = stack(alpha, beta), r [..., N] or None)``, ``quantize(W, ab, r)`` -> sign bits ``[..., N, K]`` (1 = +1),
    ``dequantize_codes(bits, ab, r) == dequantize(from_codes(bits, ab, r))`` exactly."""

    row_scale: bool = False
    bits = 1
    data_free_method = "ptb"  # what the calibration walk records for its statistics-only initialisation

    # ---- grouped protocol (one "group" = the whole row; params are per column) ---------------------------------
    def group_size_for(self, k: int) -> int:
        return k

    def params(self, W, clip=1.0):
        """``W [..., N, K]`` -> ``(ab [..., 2, K], r [..., N] | None)`` by PTB (``clip`` is ignored)."""
        _, alpha, beta, r = ptb(W, row_scale=self.row_scale)
        return torch.stack([alpha, beta], dim=-2), r

    def quantize(self, W, scale, zero=None):
        return signs_for(W, scale[..., 1, :].float(), None if zero is None else zero.float())

    def dequantize_codes(self, q, scale, zero=None):
        r = None if zero is None else zero.float()
        return reconstruct(q, scale[..., 0, :].float(), scale[..., 1, :].float(), r)

    def from_codes(self, q, scales, zeros=None) -> dict:
        if self.row_scale and zeros is None:
            raise layout.LayoutError("binary row_scale variant needs the row scales")
        packed = {"qweight": layout.pack_signs(q),
                  "alpha": scales[..., 0, :].to(torch.float16).contiguous(),
                  "beta": scales[..., 1, :].to(torch.float16).contiguous()}
        if self.row_scale:
            packed["row_scale"] = zeros.to(torch.float16).contiguous()
        return packed

    def unpack(self, packed: dict, k: int):
        """Packed -> ``(bits, ab, r)``: the inverse of :meth:`from_codes`."""
        ab = torch.stack([packed["alpha"].float(), packed["beta"].float()], dim=-2)
        r = packed["row_scale"].float() if self.row_scale else None
        return layout.unpack_signs(packed["qweight"], k), ab, r

    # ---- layout ------------------------------------------------------------------------------------------------
    def dequantize(self, packed: dict, k: int, dtype=torch.float32) -> torch.Tensor:
        return layout.dequantize_binary(packed["qweight"], packed["alpha"], packed["beta"], k,
                                        packed.get("row_scale") if self.row_scale else None, dtype)

    def buffer_specs(self, n: int, k: int, lead: tuple = ()) -> dict:
        specs = {"qweight": ((*lead, n, layout.binary_num_bytes(k)), torch.uint8),
                 "alpha": ((*lead, k), torch.float16), "beta": ((*lead, k), torch.float16)}
        if self.row_scale:
            specs["row_scale"] = ((*lead, n), torch.float16)
        return specs

    def check(self, packed: dict, n: int, k: int, lead: tuple = ()) -> None:
        layout.check_binary(packed.get("qweight"), packed.get("alpha"), packed.get("beta"), n, k,
                            packed.get("row_scale"), lead, self.row_scale)

    def to_dict(self) -> dict:
        return {"format": "binary", "bits": 1, "row_scale": self.row_scale}

    def kernel_weight(self, packed: dict, n: int, k: int):
        from qmamba.kernels.weights import BinaryWeight

        return BinaryWeight.from_packed(packed, n, k)

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """``MatMulNBits(bits=2)(x * alpha)`` (+/-1 exact, the row scale as the block scales) ``+ (x @ beta)``
        (``* row_scale``); see :func:`binary_as_matmul_nbits`."""
        block = matmul_nbits_block(k)
        codes, scales = binary_as_matmul_nbits(packed, k, block)
        return MatMulNBitsForm(2, block, {"qweight_u2": codes, "scales_b": scales}, input_scale=packed["alpha"],
                               column_term=packed["beta"], row_scale=packed.get("row_scale"))

    def describe(self) -> str:
        return "binary-rowscale" if self.row_scale else "binary"

    # ---- reference matmul: factored, W_hat is never built --------------------------------------------------
    def reference_operands(self, packed: dict, k: int, dtype=torch.float32) -> dict:
        return binary_operands(packed, k, dtype)

    def reference_matmul(self, x: torch.Tensor, operands: dict) -> torch.Tensor:
        return binary_apply(x, operands)


def binary_operands(packed: dict, k: int, dtype=torch.float32) -> dict:
    """The factored matmul's operands in ``dtype``: ``S`` (+/-1, exact in any float type), ``alpha``, ``beta`` and
    ``row_scale`` (variant only); leading expert dims are kept."""
    ops = {"S": layout.signs_pm1(packed["qweight"], k, dtype), "alpha": packed["alpha"].to(dtype),
           "beta": packed["beta"].to(dtype)}
    if "row_scale" in packed:
        ops["row_scale"] = packed["row_scale"].to(dtype)
    return ops


def binary_apply(x: torch.Tensor, ops: dict) -> torch.Tensor:
    """``(x * alpha) @ S^T + (x . beta)`` (``* r``) from :func:`binary_operands` of one matrix."""
    y = torch.nn.functional.linear(x * ops["alpha"], ops["S"]) + (x @ ops["beta"])[..., None]
    if "row_scale" in ops:
        y = y * ops["row_scale"]
    return y


def binary_as_matmul_nbits(packed: dict, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The +/-1 part of one binary matrix as an exact 2-bit ``MatMulNBits`` weight (ONNX Runtime layout).

    Codes ``q = 1 + 2 * bit`` (1 -> -1, 3 -> +1 against the default zero point 2), four per byte along K, low bits
    first, K padded to whole blocks with code 2 (exactly 0); scales are ``row_scale[n]`` per block (1 without the
    variant). Returns ``(qweight [N, n_blocks, block_size // 4] uint8, scales [N, n_blocks] float32)``; the caller
    multiplies the activation by ``alpha`` first and adds ``(x . beta) (* row_scale)``.
    """
    bits = layout.unpack_signs(packed["qweight"], k)
    n = bits.shape[0]
    n_blocks = -(-k // block_size)
    codes = 1 + 2 * bits.to(torch.int32)
    if n_blocks * block_size != k:
        codes = F.pad(codes, (0, n_blocks * block_size - k), value=2)
    codes = codes.reshape(n, n_blocks * block_size // 4, 4)
    byte = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    row = packed["row_scale"].float() if "row_scale" in packed else torch.ones(n)
    return byte.to(torch.uint8).reshape(n, n_blocks, block_size // 4), row[:, None].expand(n, n_blocks).contiguous()


def is_binary(fmt) -> bool:
    return isinstance(fmt, BinaryFormat)
