"""The kernel view of the model's modules: the weight records (:mod:`qmamba.kernels.weights`) and dense tensors
the Triton kernels read, taken from an ``nn.Linear``, a quantized linear (its format gives the record:
``module.kernel_weight()``) or an expert stack (a float ``nn.Parameter [E, N, K]`` or a packed one).

The one place where modules become kernel arguments, used by the fused decode step (:mod:`qmamba.fused_step`) and
by the MoE block's Triton forward (:meth:`qmamba.moe.SwitchMoE.kernel_operands`); the kernels themselves never see
a module. Imports nothing of the model, so both can use it without an import circle.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba.kernels.weights import BinaryWeight, PackedWeight

KernelWeight = PackedWeight | BinaryWeight


def linear_weight(module: nn.Module) -> tuple[KernelWeight, torch.Tensor | None]:
    """The kernel view of an ``nn.Linear``, ``QuantLinear`` or ``BinaryLinear`` (its format gives the record) and
    its bias."""
    if isinstance(module, nn.Linear):
        return PackedWeight.from_float(module.weight.detach()), module.bias
    if hasattr(module, "kernel_weight"):
        return module.kernel_weight(), module.bias
    raise TypeError(f"fused decode step: unsupported linear module {type(module).__name__}")


def dense_weight(module: nn.Module, dtype) -> torch.Tensor:
    """The dense weight of an ``nn.Linear``, or a quantized linear's dequantized to ``dtype`` (the router: the
    routing kernel reads a dense ``[E, d]`` weight)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.dequantized_weight(dtype)


def expert_weight(experts: nn.Module, name: str) -> KernelWeight:
    """The stacked record of ``experts.fc1`` / ``fc2`` (``name``): a float stack or a packed one."""
    w = getattr(experts, name)
    if isinstance(w, torch.Tensor):
        return PackedWeight.from_float(w.detach())
    return w.kernel_weight()
