"""The 1-bit ``binary`` weight format (Bi-Mamba form) and its modules :class:`BinaryLinear` / :class:`BinaryExperts`.

``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` with ``s = +/-1`` bit-packed 8 per byte and ``alpha``/``beta`` fp16
per input column (layout: the "binary" section of :mod:`qmamba.quant.layout`); optional per-output-row variant
``row_scale`` (``W_hat[n, k] = r[n] * (...)``). The matmul never builds ``W_hat``::

    x @ W_hat^T = (x * alpha) @ S^T + (x . beta)          (then * r per output, in the row-scale variant)

:class:`BinaryFormat` plugs into the format registry of :mod:`qmamba.quant.formats` (``{"format": "binary",
"bits": 1, "row_scale": false}`` in a manifest) and speaks the same grouped-params protocol as int4/int8, so the
calibration walk handles it like any format (method ``"ptb"``: post-training binarization from column statistics,
:mod:`qmamba.quant.binarize`)::

    params(W)      -> (ab [..., 2, K] = stack(alpha, beta), r [..., N] or None)
    quantize(W, ab, r) -> sign bits [..., N, K] uint8 (1 = +1)
    dequantize_codes(bits, ab, r) == dequantize(from_codes(bits, ab, r))   (exactly)

The modules are the int4 twins' subclasses (same constructors and call signatures); the reference matmul is the
format's (:meth:`BinaryFormat.reference_matmul`, the factored form above, its operands optionally kept by the
modules' dense cache). The ``"triton"`` backend goes through ``triton_ops.quant_linear``, which sends
the binary format to :mod:`qmamba.kernels.binary_matmul`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmamba.quant import layout
from qmamba.quant.formats import WeightFormat, register_format
from qmamba.quant.modules import QuantExperts, QuantLinear


@register_format("binary")
@dataclass(frozen=True)
class BinaryFormat(WeightFormat):
    """1 bit per weight: ``W_hat = alpha[k] * sign + beta[k]`` (``row_scale``: times ``r[n]``)."""

    row_scale: bool = False
    bits = 1
    data_free_method = "ptb"  # what the calibration walk records for its statistics-only initialisation

    # ---- grouped protocol (one "group" = the whole row; params are per column) ---------------------------------
    def group_size_for(self, k: int) -> int:
        return k

    def params(self, W, clip=1.0):
        """``W [..., N, K]`` -> ``(ab [..., 2, K], r [..., N] | None)`` by PTB (``clip`` is ignored)."""
        from qmamba.quant.binarize import ptb

        _, alpha, beta, r = ptb(W, row_scale=self.row_scale)
        return torch.stack([alpha, beta], dim=-2), r

    def quantize(self, W, scale, zero=None):
        from qmamba.quant.binarize import signs_for

        return signs_for(W, scale[..., 1, :].float(), None if zero is None else zero.float())

    def dequantize_codes(self, q, scale, zero=None):
        from qmamba.quant.binarize import reconstruct

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

    def describe(self) -> str:
        return "binary-rowscale" if self.row_scale else "binary"

    # ---- reference matmul: factored, W_hat is never built --------------------------------------------------
    def reference_operands(self, packed: dict, k: int, dtype=torch.float32) -> dict:
        return binary_operands(packed, k, dtype)

    def reference_matmul(self, x: torch.Tensor, operands: dict) -> torch.Tensor:
        return binary_apply(x, operands)

    # ---- the modules that hold this format ---------------------------------------------------------------------
    def linear_class(self):
        return BinaryLinear

    def experts_class(self):
        return BinaryExperts


def is_binary(fmt) -> bool:
    return isinstance(fmt, BinaryFormat)


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
    y = F.linear(x * ops["alpha"], ops["S"]) + (x @ ops["beta"])[..., None]
    if "row_scale" in ops:
        y = y * ops["row_scale"]
    return y


def binary_matmul(x: torch.Tensor, packed: dict, k: int) -> torch.Tensor:
    """Reference factored matmul: ``x [..., K]`` -> ``(x * alpha) @ S^T + (x . beta)`` (``* r``) ``[..., N]``.

    Computed in ``x.dtype`` (the +/-1 matrix is exact in any float type)."""
    return binary_apply(x, binary_operands(packed, k, x.dtype))


class BinaryLinear(QuantLinear):
    """:class:`QuantLinear` in the binary format: ``x [..., in] -> [..., out]``; reference = factored matmul
    (the format's :meth:`BinaryFormat.reference_matmul`)."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat | None = None, bias: bool = False,
                 device=None, bias_dtype=torch.float32):
        fmt = fmt or BinaryFormat()
        if not is_binary(fmt):
            raise TypeError(f"BinaryLinear needs the binary format, got {fmt.describe()}")
        super().__init__(in_features, out_features, fmt, bias, device=device, bias_dtype=bias_dtype)


class BinaryExperts(QuantExperts):
    """:class:`QuantExperts` where fc1 and/or fc2 are binary (the other may be int4/int8/float); each packed
    matrix uses its own format's reference matmul."""


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

