"""A selective scan for training on any device: the same math as :func:`selective_scan_ref`, arranged so that
autograd stays cheap.

The reference scan slices ``u[:, t]`` etc. at every step; autograd turns each slice into a full-size zero tensor in
the backward pass (O(L^2) work). Here every per-token factor is computed for the whole sequence at once
(``decay = exp(delta * A)``, ``inject = delta * B * u``), the sequence is split with ``unbind`` (one ``stack`` in the
backward), and only the two-op recurrence ``h = decay_t * h + inject_t`` runs step by step. The result equals the
reference to float rounding (tests/calib/test_train.py).

:func:`fast_training_scan` swaps it into every :class:`MambaMixer` of a model for the duration of a ``with`` block
(an instance attribute, so the model class and other models are untouched).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from qmamba import ops
from qmamba.mamba_mixer import MambaMixer


def selective_scan_train(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                         delta_softplus: bool = True):
    """Same signature and result as :func:`qmamba.kernels.selective_scan.selective_scan_ref`:
    ``u, delta, z [B, L, D]``, ``B_ssm, C_ssm [B, L, N]``, ``A [D, N]`` -> ``(y [B, L, D] in u.dtype,
    final state [B, D, N] fp32)``."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, length, dim = u.shape
    decay = torch.exp(delta[..., None] * A.float())                              # [B, L, D, N]
    inject = (delta * u)[..., None] * B_ssm.float()[:, :, None, :]               # [B, L, D, N]
    h = (torch.zeros(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
         if initial_state is None else initial_state.float())
    states = []
    for a_t, b_t in zip(decay.unbind(1), inject.unbind(1)):
        h = a_t * h + b_t
        states.append(h)
    if states:
        y = (torch.stack(states, dim=1) * C_ssm.float()[:, :, None, :]).sum(-1)  # einsum would be a slow bmm
    else:
        y = u.new_zeros(batch, 0, dim)
    if D_skip is not None:
        y = y + u * D_skip.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype), h


def _mixer_forward_train(self: MambaMixer, h, conv_state=None, ssm_state=None):
    """:meth:`MambaMixer.forward` with :func:`selective_scan_train` (same inputs and outputs)."""
    x, z = self.in_proj(h).chunk(2, dim=-1)
    x, conv_state = ops.causal_conv1d(self.backend, x, self.conv_weight, self.conv_bias, conv_state, "silu")
    delta, B_ssm, C_ssm = self._ssm_inputs(x)
    A = -torch.exp(self.A_log.float())
    y, ssm_state = selective_scan_train(x, delta, A, B_ssm, C_ssm, self.D, z, self.dt_bias, ssm_state, True)
    return self.out_proj(y), conv_state, ssm_state


@contextlib.contextmanager
def fast_training_scan(model: torch.nn.Module):
    """Inside the block, the model's Mamba mixers run :func:`selective_scan_train` in their parallel forward."""
    mixers = [block.mixer for block in model.blocks if block.is_mamba]
    for m in mixers:
        m.forward = types.MethodType(_mixer_forward_train, m)
    try:
        yield model
    finally:
        for m in mixers:
            if "forward" in m.__dict__:
                del m.forward
