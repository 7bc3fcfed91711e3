"""The qmamba::SelectiveScan node alone: both function bodies under onnxruntime, the Scan body under
onnx.reference, and the onnxruntime-extensions numpy kernel, each against the PyTorch reference scan."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qmamba.export import scan_op  # noqa: E402
from qmamba.kernels.selective_scan import selective_scan_ref  # noqa: E402

DI, N = 12, 5


def scan_inputs(batch=2, length=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(batch, length, DI, generator=g) for _ in range(3))
    B, C = (torch.randn(batch, length, N, generator=g) for _ in range(2))
    A = -torch.rand(DI, N, generator=g) * 3 - 0.05
    D, dt_bias = torch.randn(DI, generator=g), torch.randn(DI, generator=g) - 1
    h0 = torch.randn(batch, DI, N, generator=g)
    tensors = dict(u=u.to(dtype), delta=delta.to(dtype), A=A, B=B.to(dtype), C=C.to(dtype), D=D, z=z.to(dtype),
                   dt_bias=dt_bias, initial_state=h0)
    return tensors


def reference(t):
    return selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                              t["initial_state"])


def feeds(t):
    return {k: v.numpy() for k, v in t.items()}


def session(model, so=None):
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("body", scan_op.SCAN_BODIES)
@pytest.mark.parametrize("length", [1, 7])
def test_function_body_matches_reference_scan(body, length):
    model = scan_op.standalone_scan_model(body, DI, N)
    onnx.checker.check_model(model, full_check=True)
    t = scan_inputs(length=length, seed=length)
    y, h = session(model).run(None, feeds(t))
    y_ref, h_ref = reference(t)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


@pytest.mark.parametrize("body", scan_op.SCAN_BODIES)
def test_function_body_fp16_activations(body):
    model = scan_op.standalone_scan_model(body, DI, N, elem_type=onnx.TensorProto.FLOAT16)
    t = scan_inputs(dtype=torch.float16)
    y, h = session(model).run(None, feeds(t))
    assert y.dtype == np.float16 and h.dtype == np.float32
    y_ref, h_ref = reference(t)
    assert rel(y, y_ref.float()) < 2e-3 and rel(h, h_ref) < 1e-5


def test_scan_body_runs_in_onnx_reference():
    from onnx.reference import ReferenceEvaluator

    model = scan_op.standalone_scan_model("scan", DI, N)
    t = scan_inputs(length=5)
    y, h = ReferenceEvaluator(model).run(None, feeds(t))
    y_ref, h_ref = reference(t)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


def test_numpy_kernel_matches_reference_scan():
    from qmamba.export.ext_kernel import selective_scan_numpy

    t = scan_inputs(length=9, seed=3)
    y, h = selective_scan_numpy(*(t[k].numpy() for k in scan_op.INPUTS))
    y_ref, h_ref = reference(t)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


@pytest.mark.parametrize("body", scan_op.SCAN_BODIES)
def test_extensions_kernel_replaces_the_function_and_agrees(body):
    pytest.importorskip("onnxruntime_extensions")
    from qmamba.export.ext_kernel import kernel_calls, register_selective_scan_kernel

    so = ort.SessionOptions()
    so.register_custom_ops_library(register_selective_scan_kernel())
    model = scan_op.standalone_scan_model(body, DI, N)
    t = scan_inputs(length=4, seed=11)
    before = kernel_calls()
    y_k, h_k = session(model, so).run(None, feeds(t))
    assert kernel_calls() == before + 1  # the registered kernel ran, not the inlined function
    y_f, h_f = session(model).run(None, feeds(t))
    assert rel(y_k, y_f) < 1e-5 and rel(h_k, h_f) < 1e-5


def test_unknown_body_is_rejected():
    with pytest.raises(ValueError, match="unknown scan body"):
        scan_op.selective_scan_function("chunked", 21)


def test_extensions_kernel_refuses_fp16_models(tmp_path):
    """float16 inputs would abort the process inside onnxruntime-extensions: refused up front."""
    from qmamba.errors import UserError
    from qmamba.export.ext_kernel import check_float32_model

    path = tmp_path / "scan16.onnx"
    onnx.save(scan_op.standalone_scan_model("scan", DI, N, elem_type=onnx.TensorProto.FLOAT16), path)
    with pytest.raises(UserError, match="fp32 models only"):
        check_float32_model(path)
    onnx.save(scan_op.standalone_scan_model("scan", DI, N), tmp_path / "scan32.onnx")
    check_float32_model(tmp_path / "scan32.onnx")
