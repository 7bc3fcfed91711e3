"""``int4``: group-wise int4 along K (asymmetric with zero points by default, symmetric = zero point 8), the
ONNX Runtime ``MatMulNBits`` layout of :mod:`qmamba.quant.layout` ("int4" section). The group size travels with
the format into its kernel record (:meth:`qmamba.kernels.weights.PackedWeight.from_int4`) and its ONNX form
(block = group, the packed tensors unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.errors import ConfigError
from qmamba.quant import layout
from qmamba.quant.formats.base import MatMulNBitsForm, WeightFormat, as_clip, fp16_scale, register_format


@register_format("int4")
@dataclass(frozen=True)
class Int4Format(WeightFormat):
    """Group-wise int4 (ONNX Runtime MatMulNBits layout): ``W = (q - zero) * scale`` per group of K.

    Asymmetric (default): the group's range [min(w, 0), max(w, 0)] maps to codes 0..15 with an integer zero point.
    Symmetric: zero point 8, ``scale = max|w| / 7``, codes clamped to 0..15 (so -8 is reachable, +8 is not).
    K not a multiple of the group size is padded up to whole groups (padded codes = zero point, i.e. exactly 0).
    """

    group_size: int = 128
    symmetric: bool = False
    bits = 4

    def __post_init__(self):
        if type(self.group_size) is not int or self.group_size not in layout.INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size must be one of {layout.INT4_GROUP_SIZES}, got {self.group_size}")

    @classmethod
    def from_options(cls, group_size: int = 128, symmetric: bool = False) -> "Int4Format":
        return cls(group_size=int(group_size), symmetric=bool(symmetric))

    def group_size_for(self, k: int) -> int:
        return self.group_size

    def params(self, W, clip=1.0):
        Wg, k = self._grouped(W)
        if Wg.shape[-1] * Wg.shape[-2] != k:  # padded tail: its statistics come from the real columns only
            mask = torch.arange(Wg.shape[-2] * Wg.shape[-1], device=W.device).reshape(Wg.shape[-2:]) < k
            big = torch.finfo(torch.float32).max
            w_max = torch.where(mask, Wg, torch.full_like(Wg, -big)).amax(-1)
            w_min = torch.where(mask, Wg, torch.full_like(Wg, big)).amin(-1)
        else:
            w_max, w_min = Wg.amax(-1), Wg.amin(-1)
        ratio = as_clip(clip, w_max)
        if self.symmetric:
            amax = torch.maximum(w_max.abs(), w_min.abs()) * ratio
            scale = fp16_scale(amax / 7.0)
            return scale, torch.full_like(scale, 8.0)
        w_max = w_max.clamp(min=0) * ratio
        w_min = w_min.clamp(max=0) * ratio
        scale = fp16_scale((w_max - w_min) / 15.0)
        zero = torch.round(-w_min / scale).clamp(0, 15)
        return scale, zero

    def quantize(self, W, scale, zero):
        k = W.shape[-1]
        q = torch.round(W.float() / self.expand_groups(scale, k)) + self.expand_groups(zero.float(), k)
        return q.clamp(0, 15).to(torch.uint8)

    def dequantize_codes(self, q, scale, zero):
        k = q.shape[-1]
        return (q.float() - self.expand_groups(zero.float(), k)) * self.expand_groups(scale, k)

    def from_codes(self, q, scales, zeros) -> dict:
        if zeros is None:
            zeros = torch.full_like(scales, 8.0)
        return layout.pack_int4(q, scales, zeros, self.group_size)

    def dequantize(self, packed: dict, k: int, dtype=torch.float32) -> torch.Tensor:
        return layout.dequantize_int4(packed["qweight"], packed["scales"], packed["zeros"], k, dtype)

    def buffer_specs(self, n: int, k: int, lead: tuple = ()) -> dict:
        nb = layout.int4_num_blocks(k, self.group_size)
        return {"qweight": ((*lead, n, nb, self.group_size // 2), torch.uint8),
                "scales": ((*lead, n, nb), torch.float16),
                "zeros": ((*lead, n, (nb + 1) // 2), torch.uint8)}

    def check(self, packed: dict, n: int, k: int, lead: tuple = ()) -> None:
        layout.check_int4(packed["qweight"], packed["scales"], packed["zeros"], n, k, self.group_size, lead)

    def unpack(self, packed: dict, k: int):
        q, z = layout.unpack_int4(packed["qweight"], packed["zeros"], k)
        return q, packed["scales"].float(), z.float()

    def kernel_weight(self, packed: dict, n: int, k: int):
        from qmamba.kernels.weights import PackedWeight

        return PackedWeight.from_int4(packed, n, k, self.group_size)

    def plane_kernel_weight(self, planes: dict, n: int, k: int):
        """The kernel record of the same weight held as plane words (``planes["qweight"]`` from
        :func:`qmamba.quant.layout.int4_to_planes`; scales and zero points as stored)."""
        from qmamba.kernels.weights import PackedWeight

        return PackedWeight.from_int4_planes(planes, n, k, self.group_size)

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """4-bit ``MatMulNBits``, block = the group: the packed tensors unchanged (the layout *is* MatMulNBits')."""
        return MatMulNBitsForm(4, self.group_size, {key: packed[key] for key in ("qweight", "scales", "zeros")})

    def describe(self) -> str:
        return f"int4-g{self.group_size}{'-sym' if self.symmetric else ''}"
