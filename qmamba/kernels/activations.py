"""The expert activations as Triton device functions, shared by every kernel that fuses one (the MoE's
elementwise gated activation, the decode GEMVs' gated fc1, the prefill GEMM's gated epilogue)."""

from __future__ import annotations

from qmamba.kernels._triton import jit, tl

ACTIVATION_IDS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}


@jit
def _erf_gelu(v):
    return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))


@jit
def activate(a, ACT: tl.constexpr):
    """The expert activation of :data:`ACTIVATION_IDS` on fp32 ``a``."""
    if ACT == 0:
        a = _erf_gelu(a)
    elif ACT == 1:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 2:
        a = a * tl.sigmoid(a)
    else:
        a = tl.maximum(a, 0.0)
    return a
