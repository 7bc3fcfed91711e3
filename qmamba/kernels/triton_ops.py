"""Entry points of the ``"triton"`` backend, imported lazily by :mod:`qmamba.ops`, the quantized modules and the
MoE block. Signatures follow the reference ops; every call goes through the ``qmamba::`` custom ops (so
``torch.compile`` can trace the model), which launch the Triton kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba.kernels import custom_ops
from qmamba.kernels.weights import BinaryWeight, PackedWeight


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


# ---- weights: each format gives its kernel record (fmt.kernel_weight); the record's type picks the kernel --------------
def quant_linear(x: torch.Tensor, fmt, packed: dict, n: int, k: int, bias=None) -> torch.Tensor:
    """``x [..., K] @ W_hat^T (+ bias)`` -> ``[..., N]`` for a packed weight ``packed`` of format ``fmt``."""
    weight = fmt.kernel_weight(packed, n, k)
    if isinstance(weight, BinaryWeight):  # 1-bit: its own kernel (kernels/binary_matmul.py)
        from qmamba.kernels.binary_matmul import binary_linear

        return binary_linear(x, packed, n, k, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = custom_ops.dequant_matmul(x2, weight.fmt, n, k, packed["qweight"], packed.get("scales"),
                                  packed.get("zeros"), bias)
    return y.reshape(*lead, n)


def linear(x: torch.Tensor, weight: PackedWeight | BinaryWeight, bias=None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` for a kernel record (a quantized module's ``kernel_weight()``,
    whatever layout it holds, int4 plane words included)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.k)
    if isinstance(weight, BinaryWeight):
        from qmamba.kernels.binary_matmul import binary_matmul_op

        if weight.n_experts != 1:
            raise ValueError("linear: a stacked weight needs an expert")
        rs = weight.row_scale[0] if weight.row_scale is not None else None
        y = binary_matmul_op(x2, weight.n, weight.k, weight.qweight[0], weight.alpha[0], weight.beta[0], rs, bias)
    else:
        y = custom_ops.dequant_matmul(x2, weight.fmt, weight.n, weight.k, weight.qweight[0],
                                      None if weight.scales is None else weight.scales[0],
                                      None if weight.zeros is None else weight.zeros[0], bias)
    return y.reshape(*lead, weight.n)


def experts_kernel_weight(experts: nn.Module, name: str) -> PackedWeight | BinaryWeight:
    """The kernel record of ``experts.fc1``/``fc2``: a float stack (``nn.Parameter [E, N, K]``) or a packed one
    (``PackedExpertWeight``, whose format gives the record)."""
    w = getattr(experts, name)
    return PackedWeight.from_float(w) if isinstance(w, torch.Tensor) else w.kernel_weight()


def _op_args(weight: PackedWeight):
    """``(fmt_id, n, qweight, scales, zeros)``: a stacked record as the ``qmamba::moe_forward`` op's arguments."""
    return weight.fmt, weight.n, weight.qweight, weight.scales, weight.zeros


def router_weight(router: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The ``[E, d]`` weight the routing kernel reads: an ``nn.Linear``'s own, a quantized router's dequantized."""
    return router.weight if isinstance(router, nn.Linear) else router.dequantized_weight(dtype)


def moe_route(moe: nn.Module, x: torch.Tensor):
    """``(expert_idx [T] int32, weight [T] fp32)`` of ``x [T, d]``: the routing kernel that :func:`switch_moe` (and
    its binary twin) run first, alone, on the same router weight and bias (for recording the routing)."""
    from qmamba.kernels.fused_moe import route_top1

    router = moe.router
    return route_top1(x, router_weight(router, x.dtype), router.bias)


def switch_moe(moe: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """:class:`qmamba.moe.SwitchMoE` forward on the fused kernels: ``h [..., d]`` -> ``[..., d]``."""
    experts, router = moe.experts, moe.router
    fc1, fc2 = experts_kernel_weight(experts, "fc1"), experts_kernel_weight(experts, "fc2")
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    router_w = router_weight(router, x.dtype)
    if isinstance(fc1, BinaryWeight) or isinstance(fc2, BinaryWeight):  # 1-bit experts: kernels/binary_matmul.py
        from qmamba.kernels.binary_matmul import binary_moe_forward

        out = binary_moe_forward(x, router_w, router.bias, fc1, fc2, experts.activation, experts.gated)
    else:
        out = custom_ops.moe_forward(x, router_w, router.bias, *_op_args(fc1), *_op_args(fc2), experts.activation,
                                     experts.gated)
    return out.reshape(shape)
