"""The Triton kernels as ``torch.library`` custom ops (namespace ``qmamba``), each with a fake (meta) implementation,
so ``torch.compile`` and other tracers see opaque ops with known output shapes instead of Triton launches.

Ops are pure (they allocate their outputs). The in-place variants used by the captured decode step call the
launchers directly (see :mod:`qmamba.kernels.decode_step`). A weight travels as its kernel record's fields
(:mod:`qmamba.kernels.weights`): :func:`weight_args` flattens a :class:`PackedWeight` (format id, sizes, group size,
stacked tensors) and the op rebuilds the same record from them, so nothing is re-derived from a shape;
:func:`binary_args` does the same for a :class:`BinaryWeight`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qmamba.kernels import binary_matmul as _bin
from qmamba.kernels import causal_conv1d as _conv
from qmamba.kernels import decode_step as _step
from qmamba.kernels import fused_moe as _moe
from qmamba.kernels import quant_matmul as _qmm
from qmamba.kernels import selective_scan as _scan
from qmamba.kernels.weights import BinaryWeight, PackedWeight


def weight_args(weight: PackedWeight) -> tuple:
    """``(fmt, n, k, group_size, qweight, scales, zeros)``: a record as an op's flat arguments."""
    return weight.fmt, weight.n, weight.k, weight.group_size, weight.qweight, weight.scales, weight.zeros


def weight_from_args(fmt: int, n: int, k: int, group_size: int, qweight: Tensor, scales: Optional[Tensor],
                     zeros: Optional[Tensor]) -> PackedWeight:
    """The record :func:`weight_args` flattened (its tensors stacked ``[E, N, ...]`` as the record holds them)."""
    return PackedWeight(fmt, n, k, qweight.shape[0], qweight, scales, zeros, group_size)


def binary_args(weight: BinaryWeight) -> tuple:
    """``(n, k, qweight, alpha, beta, row_scale)``: a 1-bit record as an op's flat arguments."""
    return weight.n, weight.k, weight.qweight, weight.alpha, weight.beta, weight.row_scale


# ---- residual add + norm ------------------------------------------------------------------------------------------
@torch.library.custom_op("qmamba::add_norm_rows", mutates_args=())
def add_norm_rows(residual: Optional[Tensor], h: Tensor, norm_w: Tensor, norm_b: Optional[Tensor], eps: float,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _step.add_norm_rows(residual, h, norm_w, eps, norm_b, out_dtype)


@add_norm_rows.register_fake
def _(residual, h, norm_w, norm_b, eps, out_dtype):
    return h.new_empty(h.shape, dtype=torch.float32), h.new_empty(h.shape, dtype=out_dtype)


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
def dequant_matmul(x: Tensor, fmt: int, n: int, k: int, group_size: int, qweight: Tensor, scales: Optional[Tensor],
                   zeros: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``x [M, K] @ W_hat^T (+ bias)`` -> ``[M, N]``; the weight as :func:`weight_args` gives it."""
    return _qmm.dequant_matmul(x, weight_from_args(fmt, n, k, group_size, qweight, scales, zeros), bias)


@dequant_matmul.register_fake
def _(x, fmt, n, k, group_size, qweight, scales, zeros, bias):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("qmamba::binary_matmul", mutates_args=())
def binary_matmul(x: Tensor, n: int, k: int, qweight: Tensor, alpha: Tensor, beta: Tensor,
                  row_scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``x [M, K] @ W_hat^T (+ bias)`` -> ``[M, N]`` for one 1-bit matrix, as :func:`binary_args` gives it."""
    return _bin.binary_matmul(x, BinaryWeight(n, k, qweight, alpha, beta, row_scale), bias)


@binary_matmul.register_fake
def _(x, n, k, qweight, alpha, beta, row_scale, bias):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("qmamba::moe_forward", mutates_args=())
def moe_forward(x: Tensor, router_w: Tensor, router_b: Optional[Tensor], fc1_fmt: int, fc1_n: int, fc1_k: int,
                fc1_g: int, fc1_q: Tensor, fc1_s: Optional[Tensor], fc1_z: Optional[Tensor], fc2_fmt: int, fc2_n: int,
                fc2_k: int, fc2_g: int, fc2_q: Tensor, fc2_s: Optional[Tensor], fc2_z: Optional[Tensor],
                activation: str, gated: bool) -> Tensor:
    """Top-1 sigmoid MoE ``x [T, d]`` -> ``[T, d]`` (routing weight applied); fc1 and fc2 as :func:`weight_args`
    gives them."""
    fc1 = weight_from_args(fc1_fmt, fc1_n, fc1_k, fc1_g, fc1_q, fc1_s, fc1_z)
    fc2 = weight_from_args(fc2_fmt, fc2_n, fc2_k, fc2_g, fc2_q, fc2_s, fc2_z)
    return _moe.moe_forward(x, router_w, router_b, fc1, fc2, activation, gated)


@moe_forward.register_fake
def _(x, router_w, router_b, fc1_fmt, fc1_n, fc1_k, fc1_g, fc1_q, fc1_s, fc1_z, fc2_fmt, fc2_n, fc2_k, fc2_g, fc2_q,
      fc2_s, fc2_z, activation, gated):
    return x.new_empty(x.shape[0], fc2_n)
