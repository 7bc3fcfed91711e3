"""Recurrent inference state as flat, per-layer-stacked tensors.

``conv_state [n_mamba_layers, B, d_inner, d_conv]`` (activation dtype) holds each Mamba layer's last d_conv
pre-conv inputs; ``ssm_state [n_mamba_layers, B, d_inner, d_state]`` is float32. The same two tensors serve the
eager step, CUDA-graph replay (updated in place) and the ONNX decode graph (inputs and outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.config import ModelConfig


@dataclass
class InferenceState:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, device=None, dtype=torch.float32) -> "InferenceState":
        n = cfg.n_mamba_layers
        return cls(torch.zeros(n, batch, cfg.d_inner, cfg.d_conv, device=device, dtype=dtype),
                   torch.zeros(n, batch, cfg.d_inner, cfg.d_state, device=device, dtype=torch.float32))

    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[1]

    def clone(self) -> "InferenceState":
        return InferenceState(self.conv_state.clone(), self.ssm_state.clone())
