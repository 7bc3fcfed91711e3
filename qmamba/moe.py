"""BlackMamba's Switch-MoE block (top-1, sigmoid router with bias) and the stacked expert MLPs.

Inference routing: ``p = sigmoid(router(h))``, ``e = argmax(p)``, ``out = p[e] * expert_e(h)`` (no renormalisation).
Expert: ``a, b = chunk(fc1(h), 2)``; ``out = fc2(act(a) * b)`` (gated) or ``fc2(act(fc1(h)))``.
Experts are stored stacked: ``fc1 [E, fc1_rows, d]``, ``fc2 [E, d, ffn]``.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from qmamba.config import ModelConfig


_DECODE_STEP = contextvars.ContextVar("qmamba_moe_decode_step", default=False)


@contextlib.contextmanager
def decode_step():
    """The scope of a single-token step (:meth:`qmamba.model.MambaLM.step`): reference experts with
    ``int8_step_fc1`` (:class:`qmamba.quant.modules.QuantExperts`) then round fc1's input as the fused step's W4A8
    row programs do at 2+ rows, where a prefill's rows keep theirs below the W4A8 prefill's row count."""
    token = _DECODE_STEP.set(True)
    try:
        yield
    finally:
        _DECODE_STEP.reset(token)


def in_decode_step() -> bool:
    """Whether the experts run inside :func:`decode_step`."""
    return _DECODE_STEP.get()


def activation_fn(name: str):
    return {
        "gelu": lambda x: F.gelu(x),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }[name]


def expert_mlp(x, fc1, fc2, activation: str, gated: bool, fc1_fn=None, fc2_fn=None):
    """One expert on its tokens; ``fc1_fn``/``fc2_fn`` default to ``F.linear`` with the given weights."""
    a = F.linear(x, fc1) if fc1_fn is None else fc1_fn(x)
    act = activation_fn(activation)
    if gated:
        a, b = a.chunk(2, dim=-1)
        a = act(a) * b
    else:
        a = act(a)
    return F.linear(a, fc2) if fc2_fn is None else fc2_fn(a)


class StackedExperts(nn.Module):
    """All experts of one MoE layer. ``forward(x [T, d], expert_idx [T]) -> [T, d]`` (unscaled)."""

    def __init__(self, n_experts: int, d_model: int, ffn_hidden: int, gated: bool, activation: str):
        super().__init__()
        rows = 2 * ffn_hidden if gated else ffn_hidden
        self.n_experts, self.gated, self.activation = n_experts, gated, activation
        self.fc1 = nn.Parameter(torch.zeros(n_experts, rows, d_model))
        self.fc2 = nn.Parameter(torch.zeros(n_experts, d_model, ffn_hidden))

    def forward(self, x, expert_idx):
        out = x.new_zeros(x.shape[0], self.fc2.shape[1])
        for e in range(self.n_experts):
            rows = (expert_idx == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[rows] = expert_mlp(x[rows], self.fc1[e].to(x.dtype), self.fc2[e].to(x.dtype),
                                       self.activation, self.gated).to(out.dtype)  # bf16 under autocast
        return out


def route_top1(router_logits):
    """Sigmoid top-1 routing: returns ``(expert_idx [T], weight [T])``."""
    probs = torch.sigmoid(router_logits.float())
    weight, idx = probs.max(dim=-1)
    return idx, weight


class SwitchMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, n_experts: int):
        super().__init__()
        self.router = nn.Linear(cfg.d_model, n_experts, bias=True)
        self.backend = "reference"  # "triton": routing and experts on the fused kernels (qmamba/kernels/fused_moe.py)
        self.experts = StackedExperts(n_experts, cfg.d_model, cfg.ffn_hidden, cfg.expert_gated,
                                      cfg.expert_activation)

    def router_operands(self, dtype) -> tuple:
        """``(router_w [E, d], router_b)`` as the routing kernel reads them (a quantized router dequantized to
        ``dtype``)."""
        from qmamba.kernel_view import dense_weight  # lazily: the Triton path only

        return dense_weight(self.router, dtype), self.router.bias

    def kernel_operands(self, dtype) -> tuple:
        """What the Triton MoE kernels read, in the order :func:`qmamba.kernels.triton_ops.switch_moe` takes them:
        ``(router_w [E, d], router_b, fc1, fc2, activation, gated)``, fc1 / fc2 the experts' stacked kernel records.
        The fused decode step takes the same views (:mod:`qmamba.kernel_view`)."""
        from qmamba.kernel_view import expert_weight  # lazily: the Triton path only

        experts = self.experts
        return (*self.router_operands(dtype), expert_weight(experts, "fc1"), expert_weight(experts, "fc2"),
                experts.activation, experts.gated)

    def route(self, x):
        """Top-1 routing of ``x [T, d]`` exactly as this block's forward decides it on its backend:
        ``(expert_idx [T], weight [T] fp32)``. The Triton forward routes inside its fused kernels
        (:func:`qmamba.kernels.triton_ops.switch_moe`, without calling ``self.router``); here the same routing
        kernel runs alone on the same router weight, so what :func:`qmamba.eval.record_routing` records is the
        decision the fused forward takes."""
        if self.backend == "triton":
            from qmamba.kernels import triton_ops  # lazily: triton is optional on CPU

            return triton_ops.moe_route(x, *self.router_operands(x.dtype))
        return route_top1(self.router(x))

    def forward(self, h):
        """``h [..., d]`` -> ``[..., d]``."""
        if self.backend == "triton":
            from qmamba.kernels import triton_ops  # lazily: triton is optional on CPU

            return triton_ops.switch_moe(h, *self.kernel_operands(h.dtype))
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        idx, weight = self.route(x)
        out = self.experts(x, idx) * weight[:, None].to(x.dtype)
        return out.reshape(shape)
