"""Selective scan (Mamba-1 SSM recurrence) for prefill, and its pure-PyTorch reference twin.

Layout is token-major ("channels last"), the layout the projections produce:
    u, delta, z : [B, L, D]      B_ssm, C_ssm : [B, L, N]      A : [D, N]      D_skip, delta_bias : [D]
    initial_state / final state : [B, D, N] float32
Math (fp32):  delta = softplus(delta + delta_bias);  h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
              y_t = <C_t, h_t> + D * u_t;  y_t *= silu(z_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                       delta_softplus: bool = True):
    """Sequential reference scan: obviously right, slow. Returns ``(y [B, L, D] in u.dtype, state fp32)``."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    A, B_ssm, C_ssm = A.float(), B_ssm.float(), C_ssm.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, length, dim = u.shape
    state = (torch.zeros(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
             if initial_state is None else initial_state.float().clone())
    ys = []
    for t in range(length):
        d_t = delta[:, t, :, None]                                   # [B, D, 1]
        state = torch.exp(d_t * A) * state + d_t * B_ssm[:, t, None, :] * u[:, t, :, None]
        ys.append(torch.einsum("bdn,bn->bd", state, C_ssm[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, dim)
    if D_skip is not None:
        y = y + u * D_skip.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype), state


def selective_state_update_ref(state, x, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None,
                               delta_softplus: bool = True):
    """One decode step of the scan. ``state [B, D, N]`` fp32, ``x, delta, z [B, D]``, ``B_ssm, C_ssm [B, N]``.

    Returns ``(y [B, D] in x.dtype, new_state fp32)``; the input state is not modified.
    """
    y, new_state = selective_scan_ref(x[:, None], delta[:, None], A, B_ssm[:, None], C_ssm[:, None], D_skip,
                                      None if z is None else z[:, None], delta_bias, state, delta_softplus)
    return y[:, 0], new_state
