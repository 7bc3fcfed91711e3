"""The Triton kernels as ``torch.library`` custom ops (namespace ``qmamba``), each with a fake (meta) implementation,
so ``torch.compile`` and other tracers see opaque ops with known output shapes instead of Triton launches.

Ops are pure (they allocate their outputs). The in-place variants used by the captured decode step call the
launchers directly (see :mod:`qmamba.kernels.decode_step`). Weights travel as their layout tensors plus the format
id of :mod:`qmamba.kernels.weights` (0 float, 1 int8, 2 int4).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qmamba.kernels import causal_conv1d as _conv
from qmamba.kernels import fused_moe as _moe
from qmamba.kernels import quant_matmul as _qmm
from qmamba.kernels import selective_scan as _scan
from qmamba.kernels.weights import FMT_FLOAT, FMT_INT4_PLANES, FMT_INT8, PackedWeight


def packed_weight(fmt: int, n: int, k: int, qweight: Tensor, scales: Optional[Tensor],
                  zeros: Optional[Tensor]) -> PackedWeight:
    """Rebuild the kernel's weight description from an op's flat arguments."""
    if fmt == FMT_FLOAT:
        return PackedWeight.from_float(qweight)
    if fmt == FMT_INT8:
        return PackedWeight.from_int8({"qweight": qweight, "scales": scales}, n, k)
    if fmt == FMT_INT4_PLANES:  # plane words [..., N, n_blocks * g / 8] beside scales [..., N, n_blocks]
        group_size = qweight.shape[-1] * 8 // scales.shape[-1]
        return PackedWeight.from_int4_planes({"qweight": qweight, "scales": scales, "zeros": zeros}, n, k, group_size)
    group_size = qweight.shape[-1] * 2  # the op's flat arguments carry the layout tensors, [..., n_blocks, g / 2]
    return PackedWeight.from_int4({"qweight": qweight, "scales": scales, "zeros": zeros}, n, k, group_size)


# ---- selective scan / conv -------------------------------------------------------------------------------------------
@torch.library.custom_op("qmamba::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D_skip: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                   delta_softplus: bool) -> tuple[Tensor, Tensor]:
    return _scan.selective_scan_triton(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state,
                                       delta_softplus)


@selective_scan.register_fake
def _(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state, delta_softplus):
    b, _, d = u.shape
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(b, d, A.shape[1],
                                                                                    dtype=torch.float32)


@torch.library.custom_op("qmamba::selective_state_update", mutates_args=())
def selective_state_update(state: Tensor, x: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor,
                           D_skip: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                           delta_softplus: bool) -> tuple[Tensor, Tensor]:
    return _scan.selective_state_update_triton(state, x, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias,
                                               delta_softplus)


@selective_state_update.register_fake
def _(state, x, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, delta_softplus):
    return x.new_empty(x.shape), torch.empty_like(state)


@torch.library.custom_op("qmamba::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                  silu: bool) -> tuple[Tensor, Tensor]:
    return _conv.causal_conv1d_triton(x, weight, bias, initial_state, "silu" if silu else None)


@causal_conv1d.register_fake
def _(x, weight, bias, initial_state, silu):
    b, _, d = x.shape
    return x.new_empty(x.shape), x.new_empty(b, d, weight.shape[1])


@torch.library.custom_op("qmamba::causal_conv1d_update", mutates_args=())
def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                         silu: bool) -> tuple[Tensor, Tensor]:
    return _conv.causal_conv1d_update_triton(x, conv_state, weight, bias, "silu" if silu else None)


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape), torch.empty_like(conv_state)


# ---- matmul / MoE ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("qmamba::dequant_matmul", mutates_args=())
def dequant_matmul(x: Tensor, fmt: int, n: int, k: int, qweight: Tensor, scales: Optional[Tensor],
                   zeros: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``x [M, K] @ W_hat^T (+ bias)`` -> ``[M, N]``."""
    return _qmm.dequant_matmul(x, packed_weight(fmt, n, k, qweight, scales, zeros), bias)


@dequant_matmul.register_fake
def _(x, fmt, n, k, qweight, scales, zeros, bias):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("qmamba::moe_forward", mutates_args=())
def moe_forward(x: Tensor, router_w: Tensor, router_b: Optional[Tensor], fc1_fmt: int, fc1_n: int,
                fc1_q: Tensor, fc1_s: Optional[Tensor], fc1_z: Optional[Tensor], fc2_fmt: int, fc2_n: int,
                fc2_q: Tensor, fc2_s: Optional[Tensor], fc2_z: Optional[Tensor], activation: str,
                gated: bool) -> Tensor:
    """Top-1 sigmoid MoE ``x [T, d]`` -> ``[T, d]`` (routing weight applied)."""
    d = x.shape[1]
    fc1 = packed_weight(fc1_fmt, fc1_n, d, fc1_q, fc1_s, fc1_z)
    ffn = fc1_n // 2 if gated else fc1_n
    fc2 = packed_weight(fc2_fmt, fc2_n, ffn, fc2_q, fc2_s, fc2_z)
    return _moe.moe_forward(x, router_w, router_b, fc1, fc2, activation, gated)


@moe_forward.register_fake
def _(x, router_w, router_b, fc1_fmt, fc1_n, fc1_q, fc1_s, fc1_z, fc2_fmt, fc2_n, fc2_q, fc2_s, fc2_z, activation,
      gated):
    return x.new_empty(x.shape[0], fc2_n)
