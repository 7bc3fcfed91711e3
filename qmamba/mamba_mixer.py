"""The Mamba-1 mixer: in_proj -> causal conv + SiLU -> x_proj -> dt_proj -> selective scan -> gate -> out_proj.

Every projection is a module (``nn.Linear`` or a quantized twin with the same call signature). The SSM
parameters (A_log, D, dt bias, conv) stay in high precision. Shapes: d = d_model, di = d_inner, r = dt_rank,
n = d_state, w = d_conv.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba import ops
from qmamba.config import ModelConfig


class MambaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, di, r, n, w = cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.d_state, cfg.d_conv
        self.d_inner, self.dt_rank, self.d_state = di, r, n
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.proj_bias)        # rows [0:di] -> x, [di:] -> z
        self.conv_weight = nn.Parameter(torch.zeros(di, w))             # depthwise causal conv
        self.conv_bias = nn.Parameter(torch.zeros(di)) if cfg.conv_bias else None
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)            # rows: [dt | B | C]
        self.dt_proj = nn.Linear(r, di, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(di))
        self.A_log = nn.Parameter(torch.zeros(di, n))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=cfg.proj_bias)
        self.backend = "reference"
        self._ssm_A, self._ssm_A_key = None, None  # ssm_A()'s tensor and the A_log it came from

    def ssm_A(self) -> torch.Tensor:
        """``A = -exp(A_log)`` in float32, computed once and reused while A_log is the same tensor, unchanged (its
        storage, version, device and dtype), so that a prefill (and its CUDA graph) runs no kernel for it; computed
        afresh where a gradient is wanted, and not kept from inside a CUDA-graph capture (the graph's own memory)."""
        a_log = self.A_log
        if (torch.is_grad_enabled() and a_log.requires_grad) or (
                a_log.is_cuda and torch.cuda.is_current_stream_capturing()):
            return -torch.exp(a_log.float())
        key = (a_log.data_ptr(), a_log._version, a_log.device, a_log.dtype)
        if self._ssm_A_key != key:
            self._ssm_A, self._ssm_A_key = -torch.exp(a_log.detach().float()), key
        return self._ssm_A

    def _ssm_inputs(self, x):
        dbc = self.x_proj(x)
        dt, B_ssm, C_ssm = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return self.dt_proj(dt), B_ssm, C_ssm

    def forward(self, h, conv_state=None, ssm_state=None):
        """Prefill. ``h [B, L, d]`` -> ``(out [B, L, d], conv_state [B, di, w], ssm_state [B, di, n] fp32)``."""
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x, conv_state = ops.causal_conv1d(self.backend, x, self.conv_weight, self.conv_bias, conv_state, "silu")
        delta, B_ssm, C_ssm = self._ssm_inputs(x)
        A = self.ssm_A()
        y, ssm_state = ops.selective_scan(self.backend, x, delta, A, B_ssm, C_ssm, self.D, z, self.dt_bias,
                                          ssm_state, True)
        return self.out_proj(y), conv_state, ssm_state

    def step(self, h, conv_state, ssm_state):
        """One token. ``h [B, d]`` -> ``(out [B, d], new conv_state, new ssm_state)``."""
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x, conv_state = ops.causal_conv1d_update(self.backend, x, conv_state, self.conv_weight, self.conv_bias,
                                                 "silu")
        delta, B_ssm, C_ssm = self._ssm_inputs(x)
        A = self.ssm_A()
        y, ssm_state = ops.selective_state_update(self.backend, ssm_state, x, delta, A, B_ssm, C_ssm, self.D, z,
                                                  self.dt_bias, True)
        return self.out_proj(y), conv_state, ssm_state
