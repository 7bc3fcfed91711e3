"""Entry points of the ``"triton"`` backend, imported lazily by :mod:`qmamba.ops`, the quantized modules and the
MoE block. Signatures follow the reference ops; every call goes through the ``qmamba::`` custom ops (so
``torch.compile`` can trace the model), which launch the Triton kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba.kernels import custom_ops
from qmamba.kernels.weights import FMT_FLOAT, FMT_INT4, FMT_INT8


# ---- sequence ops (same signatures as the *_ref functions) ------------------------------------------------------------
def selective_scan(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                   delta_softplus: bool = True):
    return custom_ops.selective_scan(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state,
                                     bool(delta_softplus))


def selective_state_update(state, x, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None,
                           delta_softplus: bool = True):
    return custom_ops.selective_state_update(state, x, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias,
                                             bool(delta_softplus))


def _silu_flag(activation):
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r}")
    return activation == "silu"


def causal_conv1d(x, weight, bias=None, initial_state=None, activation="silu"):
    return custom_ops.causal_conv1d(x, weight, bias, initial_state, _silu_flag(activation))


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    return custom_ops.causal_conv1d_update(x, conv_state, weight, bias, _silu_flag(activation))


# ---- weights -----------------------------------------------------------------------------------------------------------
def format_id(fmt) -> int:
    """Kernel format id of a :class:`qmamba.quant.formats.WeightFormat` (None = float weight)."""
    if fmt is None:
        return FMT_FLOAT
    name = getattr(fmt, "name", None)
    if name == "int8":
        return FMT_INT8
    if name == "int4":
        return FMT_INT4
    raise ValueError(f"the Triton backend has no kernel for weight format {name!r}")


def quant_linear(x: torch.Tensor, fmt, packed: dict, n: int, k: int, bias=None) -> torch.Tensor:
    """``x [..., K] @ W_hat^T (+ bias)`` -> ``[..., N]`` for a packed weight ``packed`` of format ``fmt``."""
    if getattr(fmt, "name", None) == "binary":  # 1-bit: its own kernel (kernels/binary_matmul.py)
        from qmamba.kernels.binary_matmul import binary_linear

        return binary_linear(x, packed, n, k, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = custom_ops.dequant_matmul(x2, format_id(fmt), n, k, packed["qweight"], packed.get("scales"),
                                  packed.get("zeros"), bias)
    return y.reshape(*lead, n)


def expert_weight_args(experts: nn.Module, name: str):
    """``(fmt_id, n, qweight, scales, zeros)`` of ``experts.fc1``/``fc2`` (a ``StackedExperts`` or ``QuantExperts``)."""
    w = getattr(experts, name)
    if isinstance(w, nn.Parameter) or isinstance(w, torch.Tensor):
        return FMT_FLOAT, w.shape[1], w, None, None
    packed = w.packed()
    return format_id(w.fmt), w.n, packed["qweight"], packed.get("scales"), packed.get("zeros")


def switch_moe(moe: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """:class:`qmamba.moe.SwitchMoE` forward on the fused kernels: ``h [..., d]`` -> ``[..., d]``."""
    experts = moe.experts
    if any(getattr(getattr(getattr(experts, w), "fmt", None), "name", None) == "binary" for w in ("fc1", "fc2")):
        from qmamba.kernels.binary_matmul import switch_moe_binary

        return switch_moe_binary(moe, h)
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    f1, f2 = expert_weight_args(experts, "fc1"), expert_weight_args(experts, "fc2")
    router = moe.router
    router_w = router.weight if isinstance(router, nn.Linear) else router.dequantized_weight(x.dtype)
    out = custom_ops.moe_forward(x, router_w, router.bias, *f1, *f2, experts.activation, experts.gated)
    return out.reshape(shape)
