"""``int8``: per-output-channel symmetric int8, ``W[n, k] = q[n, k] * scales[n]`` (q in [-127, 127]); one group
is the whole row. Layout: the "int8" section of :mod:`qmamba.quant.layout`; kernel record
:meth:`qmamba.kernels.weights.PackedWeight.from_int8`; ONNX form: 8-bit ``MatMulNBits`` with codes ``q + 128``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmamba.quant import layout
from qmamba.quant.formats.base import (MatMulNBitsForm, WeightFormat, as_clip, fp16_scale, matmul_nbits_block,
                                       register_format)


@register_format("int8")
@dataclass(frozen=True)
class Int8Format(WeightFormat):
    """Per-output-channel symmetric int8: ``W[n, k] = q[n, k] * scales[n]``, q in [-127, 127]."""

    bits = 8
    QMAX = 127

    def group_size_for(self, k: int) -> int:
        return k

    def params(self, W, clip=1.0):
        Wg, _ = self._grouped(W)
        amax = Wg.abs().amax(dim=-1) * as_clip(clip, Wg[..., 0])
        return fp16_scale(amax / self.QMAX), None

    def quantize(self, W, scale, zero=None):
        q = torch.round(W.float() / self.expand_groups(scale, W.shape[-1]))
        return q.clamp(-self.QMAX, self.QMAX).to(torch.int8)

    def dequantize_codes(self, q, scale, zero=None):
        return q.float() * self.expand_groups(scale, q.shape[-1])

    def from_codes(self, q, scales, zeros=None) -> dict:
        if scales.shape[-1] != 1:
            raise layout.LayoutError(f"int8 has one scale per row; got scales of shape {tuple(scales.shape)}")
        return {"qweight": q.to(torch.int8).contiguous(),
                "scales": scales[..., 0].to(torch.float16).contiguous()}

    def dequantize(self, packed: dict, k: int, dtype=torch.float32) -> torch.Tensor:
        return layout.dequantize_int8(packed["qweight"], packed["scales"], dtype)

    def buffer_specs(self, n: int, k: int, lead: tuple = ()) -> dict:
        return {"qweight": ((*lead, n, k), torch.int8), "scales": ((*lead, n), torch.float16)}

    def check(self, packed: dict, n: int, k: int, lead: tuple = ()) -> None:
        layout.check_int8(packed["qweight"], packed["scales"], n, k, lead)

    def unpack(self, packed: dict, k: int):
        """Packed -> ``(q, scale [..., N, 1], None)``: the inverse of :meth:`from_codes`."""
        return packed["qweight"], packed["scales"].float()[..., None], None

    def kernel_weight(self, packed: dict, n: int, k: int):
        from qmamba.kernels.weights import PackedWeight

        return PackedWeight.from_int8(packed, n, k)

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """8-bit ``MatMulNBits`` with codes ``q + 128`` (default zero point 128), K padded to whole blocks with code
        128 (exactly 0) and the row scale repeated per block: exact."""
        block = matmul_nbits_block(k)
        n_blocks = -(-k // block)
        codes = packed["qweight"].to(torch.int16) + 128
        if n_blocks * block != k:
            codes = F.pad(codes, (0, n_blocks * block - k), value=128)
        return MatMulNBitsForm(8, block, {"qweight_u8": codes.to(torch.uint8).reshape(n, n_blocks, block),
                                          "scales": packed["scales"][:, None].expand(n, n_blocks)})

    def to_dict(self) -> dict:
        return {"format": "int8", "bits": 8}
