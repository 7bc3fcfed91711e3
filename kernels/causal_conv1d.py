"""Causal depthwise conv1d with carried state (Mamba's short conv), prefill and decode step, reference twins.

Layout: x [B, L, D] (token-major), weight [D, W], bias [D] or None, conv state [B, D, W] holding the last W
inputs (oldest first). A prompt shorter than W reads zeros (or the carried state) before its first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, activation: str | None = "silu"):
    """Returns ``(y [B, L, D] in x.dtype, final_state [B, D, W] in x.dtype)``."""
    batch, length, dim = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width)
    # history = last W-1 carried inputs, then the new tokens: [B, D, W-1+L]
    seq = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=2)
    y = F.conv1d(seq[:, :, 1:].float(), weight.float()[:, None, :], None if bias is None else bias.float(),
                 groups=dim)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    final_state = seq[:, :, -width:].contiguous()
    return y.transpose(1, 2).to(x.dtype), final_state


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation: str | None = "silu"):
    """One decode step: ``x [B, D]``, ``conv_state [B, D, W]`` -> ``(y [B, D], new_state [B, D, W])``."""
    y, new_state = causal_conv1d_ref(x[:, None, :], weight, bias, conv_state, activation)
    return y[:, 0], new_state
