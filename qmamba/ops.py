"""Backend dispatch for the sequence ops: the pure-PyTorch reference (any device) or the Triton kernels (CUDA).

The model holds a backend name ("reference" or "triton") and calls these functions; no global switch exists.
"""

from __future__ import annotations

from qmamba.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from qmamba.kernels.decode_step import add_norm_rows_ref
from qmamba.kernels.selective_scan import selective_scan_ref, selective_state_update_ref

BACKENDS = ("reference", "triton")


def _triton_ops():
    from qmamba.kernels import triton_ops  # imported lazily: triton is optional on CPU

    return triton_ops


def selective_scan(backend, *args, **kwargs):
    if backend == "triton":
        return _triton_ops().selective_scan(*args, **kwargs)
    return selective_scan_ref(*args, **kwargs)


def selective_state_update(backend, *args, **kwargs):
    if backend == "triton":
        return _triton_ops().selective_state_update(*args, **kwargs)
    return selective_state_update_ref(*args, **kwargs)


def causal_conv1d(backend, *args, **kwargs):
    if backend == "triton":
        return _triton_ops().causal_conv1d(*args, **kwargs)
    return causal_conv1d_ref(*args, **kwargs)


def causal_conv1d_update(backend, *args, **kwargs):
    if backend == "triton":
        return _triton_ops().causal_conv1d_update(*args, **kwargs)
    return causal_conv1d_update_ref(*args, **kwargs)


def add_norm(backend, residual, h, norm_w, eps, norm_b=None, out_dtype=None):
    """``(residual + h.float(), norm(residual + h))`` (``residual`` None: the first layer, ``h.float()``); the norm
    in ``out_dtype`` (default ``norm_w``'s type), LayerNorm when ``norm_b`` is given, else RMSNorm. The Triton
    backend: one kernel."""
    if backend == "triton":
        return _triton_ops().add_norm(residual, h, norm_w, eps, norm_b, out_dtype)
    return add_norm_rows_ref(residual, h, norm_w, eps, norm_b, out_dtype)
