"""The weight records the matmul kernels read: :class:`PackedWeight` (float, int8 and int4 stacks, with the format
id ``FMT_*`` and the int4 group size) and :class:`BinaryWeight` (1-bit signs with per-column alpha / beta), each
built from the layout tensors of :mod:`qmamba.quant.layout` (checked there) and able to give its dense values (the
references' view). A quantized weight's record comes from its format: ``fmt.kernel_weight(packed, n, k)``
(:mod:`qmamba.quant.formats`). :func:`int32_words` views packed bytes as the 32-bit words the word GEMV kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qmamba.kernels._triton import cdiv
from qmamba.quant import layout

FMT_FLOAT, FMT_INT8, FMT_INT4 = 0, 1, 2  # the kernels' compile-time format switch
FMT_INT4_PLANES = 3  # int4 codes in the decode kernels' plane words (layout.int4_to_planes); same scales / zeros
FMT_BINARY = 4  # 1-bit signs read as 32-bit words (BinaryWeight; the decode kernels' switch only)


@dataclass
class PackedWeight:
    """A (stacked) weight in one of the layouts, as the kernel reads it. ``n``/``k`` are the logical sizes."""

    fmt: int
    n: int
    k: int
    n_experts: int
    qweight: torch.Tensor             # float [E, N, K] | int8 [E, N, K] | uint8 [E, N, n_blocks, g/2] | planes int32 [E, N, W]
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0

    @property
    def k_padded(self) -> int:
        return cdiv(self.k, self.group_size) * self.group_size if self.fmt in (FMT_INT4, FMT_INT4_PLANES) else self.k

    def expert(self, e: int) -> "PackedWeight":
        """Matrix ``e`` of the stack as a one-matrix record (views)."""
        pick = (lambda t: None if t is None else t[e:e + 1])
        return PackedWeight(self.fmt, self.n, self.k, 1, self.qweight[e:e + 1], pick(self.scales), pick(self.zeros),
                            self.group_size)

    def to_planes(self) -> "PackedWeight":
        """The same int4 weight with its codes in plane words (a new tensor; scales and zero points shared)."""
        if self.fmt != FMT_INT4:
            raise ValueError("only int4 weights have a plane form")
        if self.group_size % layout.INT4_TILE:
            raise ValueError(f"int4 plane words need a group size that is a multiple of {layout.INT4_TILE}, "
                             f"got {self.group_size}")
        return PackedWeight(FMT_INT4_PLANES, self.n, self.k, self.n_experts, layout.int4_to_planes(self.qweight, self.k),
                            self.scales, self.zeros, self.group_size)

    @classmethod
    def from_int8(cls, packed: dict, n: int, k: int) -> "PackedWeight":
        """From an int8 layout dict (``qweight``/``scales``) of one matrix ``[N, ...]`` or a stack ``[E, N, ...]``."""
        q = packed["qweight"]
        lead = tuple(q.shape[:-2])
        layout.check_int8(q, packed["scales"], n, k, lead)
        q3, s2 = q.reshape(-1, n, k), packed["scales"].reshape(-1, n)
        return cls(FMT_INT8, n, k, q3.shape[0], q3, s2)

    @classmethod
    def from_int4(cls, packed: dict, n: int, k: int, group_size: int) -> "PackedWeight":
        """From an int4 layout dict (``qweight``/``scales``/``zeros``) of one matrix or a stack, in groups of
        ``group_size`` (checked against the tensors' shapes)."""
        q, g = packed["qweight"], group_size
        lead = tuple(q.shape[:-3])
        layout.check_int4(q, packed["scales"], packed["zeros"], n, k, g, lead)
        nb = q.shape[-2]
        return cls(FMT_INT4, n, k, int(torch.tensor(lead).prod()) if lead else 1, q.reshape(-1, n, nb, g // 2),
                   packed["scales"].reshape(-1, n, nb), packed["zeros"].reshape(-1, n, packed["zeros"].shape[-1]), g)

    @classmethod
    def from_int4_planes(cls, planes: dict, n: int, k: int, group_size: int) -> "PackedWeight":
        """From plane words (``planes["qweight"] [..., N, W]`` int32, :func:`qmamba.quant.layout.int4_to_planes`)
        with the stored ``scales`` / ``zeros`` of one matrix or a stack; the group size a multiple of the tile."""
        q, s, z, g = planes["qweight"], planes["scales"], planes["zeros"], group_size
        layout.check_int4_planes(q, s, z, n, k, g)
        return cls(FMT_INT4_PLANES, n, k, s.numel() // (n * s.shape[-1]), q.reshape(-1, n, q.shape[-1]),
                   s.reshape(-1, n, s.shape[-1]), z.reshape(-1, n, z.shape[-1]), g)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "PackedWeight":
        """A float weight ``[N, K]`` or stack ``[E, N, K]``."""
        w3 = w if w.dim() == 3 else w[None]
        return cls(FMT_FLOAT, w3.shape[1], w3.shape[2], w3.shape[0], w3)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """``[E, N, K]`` dense (the reference's view)."""
        if self.fmt == FMT_FLOAT:
            return self.qweight.to(dtype)
        if self.fmt == FMT_INT8:
            return layout.dequantize_int8(self.qweight, self.scales, dtype)
        q = self.qweight
        if self.fmt == FMT_INT4_PLANES:
            q = layout.int4_from_planes(q, self.scales.shape[-1], self.group_size)
        return layout.dequantize_int4(q, self.scales, self.zeros, self.k, dtype)



@dataclass
class BinaryWeight:
    """A (stacked) binary weight as the kernel reads it: ``qweight [E, N, KB]``, ``alpha/beta [E, K]``,
    ``row_scale [E, N]`` or None."""

    n: int
    k: int
    qweight: Tensor
    alpha: Tensor
    beta: Tensor
    row_scale: Tensor | None = None

    fmt = FMT_BINARY  # the decode kernels' format switch (the 1-bit matmul kernels need none)

    @property
    def n_experts(self) -> int:
        return self.qweight.shape[0]

    @classmethod
    def from_packed(cls, packed: dict, n: int, k: int) -> "BinaryWeight":
        q = packed["qweight"]
        lead = tuple(q.shape[:-2])
        layout.check_binary(q, packed["alpha"], packed["beta"], n, k, packed.get("row_scale"), lead,
                            "row_scale" in packed)
        r = packed.get("row_scale")
        return cls(n, k, q.reshape(-1, n, q.shape[-1]), packed["alpha"].reshape(-1, k),
                   packed["beta"].reshape(-1, k), None if r is None else r.reshape(-1, n))

    def dequantized(self, dtype=torch.float32) -> Tensor:
        """``[E, N, K]`` dense."""
        return layout.dequantize_binary(self.qweight, self.alpha, self.beta, self.k, self.row_scale, dtype)


def int32_words(q: torch.Tensor):
    """Packed bytes ``[E, N, ...]`` (int4 ``[E, N, nb, g/2]``, binary signs ``[E, N, KB]``) as int32 words
    ``[E, N, bytes / 4]`` (a view), or None (a row not a whole number of words, or unaligned)."""
    e, n = q.shape[0], q.shape[1]
    try:
        flat = q.reshape(e, n, -1)
        if flat.stride(-1) != 1 or flat.data_ptr() % 4 or flat.stride(1) % 4 or flat.stride(0) % 4:
            return None
        return flat.view(torch.int32)
    except RuntimeError:
        return None
