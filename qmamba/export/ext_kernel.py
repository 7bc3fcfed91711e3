"""An onnxruntime-extensions kernel for ``qmamba::SelectiveScan``: a plain numpy loop over time, independent of the
function bodies in :mod:`qmamba.export.scan_op`. When it is registered in a session, onnxruntime runs this kernel
instead of inlining the model-local function, so tests can check one against the other.

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(register_selective_scan_kernel())
    session = onnxruntime.InferenceSession(path, so)

Test use only: onnxruntime-extensions runs Python on the CPU with ~1.6 ms overhead per call, and float16 inputs
abort the process (this module refuses fp16 models up front: see :func:`check_float32_model`). The kernel
registration is process-wide (onnxruntime-extensions keeps one table of Python ops), so it is done once.
"""

from __future__ import annotations

import numpy as np

from qmamba.errors import UserError

from . import scan_op

_REGISTERED = {"calls": 0, "library": None}


class ExtensionsMissing(UserError):
    """onnxruntime-extensions is not installed."""


def selective_scan_numpy(u, delta, A, B, C, D, z, dt_bias, initial_state):
    """``(y [b, L, di], final_state [b, di, n])`` in float32; math as documented in :mod:`scan_op`."""
    u, delta, B, C, z = (np.asarray(t, dtype=np.float64) for t in (u, delta, B, C, z))
    A, D, dt_bias = (np.asarray(t, dtype=np.float64) for t in (A, D, dt_bias))
    x = delta + dt_bias
    dt = np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))
    h = np.array(initial_state, dtype=np.float64)
    y = np.empty_like(u)
    for t in range(u.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t])
    y = (y + u * D) * (z / (1.0 + np.exp(-z)))
    return y.astype(np.float32), h.astype(np.float32)


def register_selective_scan_kernel() -> str:
    """Register the numpy kernel (once per process); returns the custom-op library path for SessionOptions."""
    if _REGISTERED["library"] is not None:
        return _REGISTERED["library"]
    try:
        from onnxruntime_extensions import PyOp, get_library_path, onnx_op
    except ImportError:
        raise ExtensionsMissing("the SelectiveScan test kernel needs onnxruntime-extensions "
                                "(pip install onnxruntime-extensions)") from None

    @onnx_op(op_type=f"{scan_op.DOMAIN}::{scan_op.OP_TYPE}", inputs=[PyOp.dt_float] * len(scan_op.INPUTS),
             outputs=[PyOp.dt_float] * len(scan_op.OUTPUTS), attrs={"d_inner": PyOp.dt_int64})
    def _selective_scan(u, delta, A, B, C, D, z, dt_bias, initial_state, **attrs):
        _REGISTERED["calls"] += 1
        if attrs.get("d_inner", u.shape[-1]) != u.shape[-1]:
            raise ValueError(f"SelectiveScan: d_inner attribute {attrs['d_inner']} != u.shape[-1] {u.shape[-1]}")
        return selective_scan_numpy(u, delta, A, B, C, D, z, dt_bias, initial_state)

    _REGISTERED["library"] = get_library_path()
    return _REGISTERED["library"]


def kernel_calls() -> int:
    """How many times the registered kernel ran in this process (tests check that it, not the function, ran)."""
    return _REGISTERED["calls"]


def check_float32_model(model_path) -> None:
    """Refuse fp16 models: float16 inputs abort the process inside onnxruntime-extensions."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for value in model.graph.input:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            raise UserError(f"{model_path}: the onnxruntime-extensions SelectiveScan kernel supports fp32 models only")
