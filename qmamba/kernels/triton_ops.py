"""Entry points of the ``"triton"`` backend, imported lazily by :mod:`qmamba.ops`, the quantized modules and the
MoE block. Sequence ops follow the reference ops' signatures; weights come as kernel records
(:mod:`qmamba.kernels.weights`: a format gives them, ``fmt.kernel_weight``), never as model modules. Every call
but the 1-bit MoE goes through the ``qmamba::`` custom ops (so ``torch.compile`` can trace the model), which launch
the Triton kernels.
"""

from __future__ import annotations

import torch

from qmamba.kernels import custom_ops
from qmamba.kernels import fused_moe as _moe
from qmamba.kernels.fused_moe import KernelWeight
from qmamba.kernels.weights import BinaryWeight


# ---- sequence ops (same signatures as the *_ref functions) -------------------------------------------------------
def selective_scan(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                   delta_softplus: bool = True):
    return custom_ops.selective_scan(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state,
                                     bool(delta_softplus))


def selective_state_update(state, x, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None,
                           delta_softplus: bool = True):
    return custom_ops.selective_state_update(state, x, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias,
                                             bool(delta_softplus))


def add_norm(residual, h, norm_w, eps, norm_b=None, out_dtype=None):
    """``(residual + h, norm(residual + h))`` over ``h [..., d]`` (``residual`` fp32 or None: then ``h``), one
    launch: the twin of :func:`qmamba.ops.add_norm`'s reference."""
    shape = h.shape
    rows = h.reshape(-1, shape[-1])
    r, x = custom_ops.add_norm_rows(residual.reshape(-1, shape[-1]) if residual is not None else None, rows,
                                    norm_w, norm_b, float(eps), out_dtype or norm_w.dtype)
    return r.reshape(shape), x.reshape(shape)


def _silu_flag(activation):
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r}")
    return activation == "silu"


def causal_conv1d(x, weight, bias=None, initial_state=None, activation="silu"):
    return custom_ops.causal_conv1d(x, weight, bias, initial_state, _silu_flag(activation))


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    return custom_ops.causal_conv1d_update(x, conv_state, weight, bias, _silu_flag(activation))


# ---- weights: the record's type picks the kernel ------------------------------------------------------------------
def linear(x: torch.Tensor, weight: KernelWeight, bias=None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` for one matrix's kernel record (a quantized module's
    ``kernel_weight()``, whatever layout it holds, int4 plane words included)."""
    if weight.n_experts != 1:
        raise ValueError("linear: a stacked weight needs an expert")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.k)
    if isinstance(weight, BinaryWeight):  # 1-bit: its own kernels (kernels/binary_matmul.py)
        y = custom_ops.binary_matmul(x2, *custom_ops.binary_args(weight), bias)
    else:
        y = custom_ops.dequant_matmul(x2, *custom_ops.weight_args(weight), bias)
    return y.reshape(*lead, weight.n)


def moe_route(x: torch.Tensor, router_w: torch.Tensor, router_b=None):
    """``(expert_idx [T] int32, weight [T] fp32)`` of ``x [T, d]``: the routing kernel that :func:`switch_moe` runs
    first, alone, on the same router weight ``[E, d]`` and bias (for recording the routing)."""
    return _moe.route_top1(x, router_w, router_b)


def switch_moe(h: torch.Tensor, router_w: torch.Tensor, router_b, fc1: KernelWeight, fc2: KernelWeight,
               activation: str, gated: bool) -> torch.Tensor:
    """Top-1 Switch-MoE forward on the fused kernels: ``h [..., d]`` -> ``[..., d]``; ``router_w [E, d]``, fc1 / fc2
    the experts' stacked kernel records."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    if isinstance(fc1, BinaryWeight) or isinstance(fc2, BinaryWeight):  # 1-bit experts: no custom op (yet)
        out = _moe.moe_forward(x, router_w, router_b, fc1, fc2, activation, gated)
    else:
        out = custom_ops.moe_forward(x, router_w, router_b, *custom_ops.weight_args(fc1),
                                     *custom_ops.weight_args(fc2), activation, gated)
    return out.reshape(shape)
