"""The format registry and what every format shares: :class:`WeightFormat` (the grouped-quantizer protocol, the
reference matmul, the kernel-record and ONNX-form hooks, serialisation), :func:`register_format` and
:class:`MatMulNBitsForm`, the record of a matrix's ONNX Runtime ``MatMulNBits`` form. Each format is a subclass in
its own file beside this one (``int8.py``, ``int4.py``, ``binary.py``); :mod:`qmamba.quant.formats` gathers them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

FORMATS: dict[str, type] = {}
_FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal: scales never round to 0


def register_format(name: str):
    """Class decorator: register a format config dataclass under ``name``."""

    def wrap(cls):
        cls.name = name
        FORMATS[name] = cls
        return cls

    return wrap


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales to fp16 values (kept as float32), never 0 nor inf."""
    return scale.clamp(min=_FP16_TINY, max=60000.0).to(torch.float16).float()


def as_clip(clip, like: torch.Tensor) -> torch.Tensor:
    """Clip ratio (float or tensor broadcastable to ``like`` [..., N, G]) as a tensor."""
    return torch.as_tensor(clip, dtype=torch.float32, device=like.device).expand_as(like)


class WeightFormat:
    """Common behaviour; subclasses implement the grouped quantizer and the layout conversion."""

    name = "?"
    bits = 0

    # ---- grouping ------------------------------------------------------------------------------------
    def group_size_for(self, k: int) -> int:
        raise NotImplementedError

    def n_groups(self, k: int) -> int:
        return math.ceil(k / self.group_size_for(k))

    def _grouped(self, W: torch.Tensor):
        """``W [..., N, K]`` -> ``[..., N, G, g]`` zero-padded view (float32) and K."""
        k = W.shape[-1]
        g = self.group_size_for(k)
        n_groups = math.ceil(k / g)
        Wf = W.float()
        if n_groups * g != k:
            Wf = torch.nn.functional.pad(Wf, (0, n_groups * g - k))
        return Wf.reshape(*W.shape[:-1], n_groups, g), k

    def expand_groups(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Per-group tensor ``[..., N, G]`` -> per-element ``[..., N, K]``."""
        return t.repeat_interleave(self.group_size_for(k), dim=-1)[..., :k]

    # ---- the verbs -----------------------------------------------------------------------------------
    def quantize_rtn(self, W: torch.Tensor) -> dict:
        """Round-to-nearest: ``W [..., N, K]`` -> packed dict."""
        scale, zero = self.params(W)
        return self.from_codes(self.quantize(W, scale, zero), scale, zero)

    def fake_quantize(self, W: torch.Tensor, clip=1.0) -> torch.Tensor:
        """Quantize-dequantize round trip (float32) with optional clipping ratio."""
        scale, zero = self.params(W, clip)
        return self.dequantize_codes(self.quantize(W, scale, zero), scale, zero)

    # ---- the pure-PyTorch reference matmul -------------------------------------------------------------
    def reference_operands(self, packed: dict, k: int, dtype=torch.float32) -> dict:
        """What :meth:`reference_matmul` needs, in ``dtype``: by default the dense ``W_hat [..., N, K]``. Computed
        per call, or once and kept by a module's dense cache (see :mod:`qmamba.quant.modules`)."""
        return {"weight": self.dequantize(packed, k, dtype)}

    def reference_matmul(self, x: torch.Tensor, operands: dict) -> torch.Tensor:
        """``x [..., K] @ W_hat^T`` from :meth:`reference_operands` (of one matrix)."""
        return torch.nn.functional.linear(x, operands["weight"])

    # ---- kernel record and ONNX form -----------------------------------------------------------------
    def kernel_weight(self, packed: dict, n: int, k: int):
        """The record the Triton matmuls read for one matrix ``[N, ...]`` or a stack ``[E, N, ...]``."""
        raise NotImplementedError(f"the Triton backend has no kernel for weight format {self.name!r}")

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """One matrix as ONNX Runtime's ``MatMulNBits`` (see :class:`MatMulNBitsForm`)."""
        raise NotImplementedError(f"weight format {self.name!r} has no ONNX form")

    @property
    def has_onnx_form(self) -> bool:
        """Whether this registered format defines its own ``MatMulNBits`` form (a format registered by subclassing
        another does not inherit it: its tensors may mean something else)."""
        return "matmul_nbits" in type(self).__dict__

    # ---- serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_options(cls, group_size: int = 128, symmetric: bool = False) -> "WeightFormat":
        """The format for the CLI's ``--group-size`` / ``--symmetric`` (see :func:`qmamba.quant.formats.make_format`):
        each format takes the options that apply to it and ignores the others."""
        return cls()

    def to_dict(self) -> dict:
        return {"format": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        return self.name


# ---- the ONNX form -------------------------------------------------------------------------------------------------
@dataclass
class MatMulNBitsForm:
    """One packed matrix as ONNX Runtime's ``com.microsoft.MatMulNBits``: ``bits``, ``block_size`` and its weight
    inputs after the activation, in order, by initializer suffix (``qweight*``, ``scales*`` and, for int4,
    ``zeros``; float tensors are cast to the activation dtype by the export). The 1-bit form is factored: the
    activation is multiplied by ``input_scale`` (alpha) first, and ``x @ column_term`` (beta; ``* row_scale``) is
    added to the product."""

    bits: int
    block_size: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    input_scale: torch.Tensor | None = None
    column_term: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None


def matmul_nbits_block(k: int) -> int:
    """``MatMulNBits`` block size for a row-wise format (int8, binary): the largest of 128/64/32/16 dividing ``k``,
    else 16 with K padded by zero codes."""
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    return 16
