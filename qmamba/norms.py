"""RMSNorm and LayerNorm computed in fp32, returning the compute dtype; ``add_forward`` adds the block's output to
the fp32 residual stream first (one kernel on the Triton backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qmamba import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = "reference"

    def add_forward(self, residual, h, out_dtype=None):
        """``(residual + h.float(), self(residual + h, out_dtype))`` (``residual`` None: ``h.float()``)."""
        return ops.add_norm(self.backend, residual, h, self.weight, self.eps, None, out_dtype)

    def forward(self, x, out_dtype=None):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(out_dtype or self.weight.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (BlackMamba's final norm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.backend = "reference"

    def add_forward(self, residual, h, out_dtype=None):
        """``(residual + h.float(), self(residual + h, out_dtype))`` (``residual`` None: ``h.float()``)."""
        return ops.add_norm(self.backend, residual, h, self.weight, self.eps, self.bias, out_dtype)

    def forward(self, x, out_dtype=None):
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(out_dtype or self.weight.dtype)


def make_final_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return LayerNorm(dim, eps) if kind == "layernorm" else RMSNorm(dim, eps)
