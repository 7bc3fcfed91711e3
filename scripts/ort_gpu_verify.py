"""Is onnxruntime's CUDA execution provider usable here? Prints which onnxruntime is imported, its providers, the
CUDA libraries qmamba preloads, then runs a small graph on the CUDA provider (MatMul through cuBLAS; Gelu, Add and a
4-bit MatMulNBits, onnxruntime's own GPU kernels) and compares it with the CPU provider. Exit 0 only when the CUDA
provider ran every node and agreed with the CPU.

    python scripts/ort_gpu_verify.py [--quiet]      (scripts/ort_gpu_setup.sh verify runs it in the right environment)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def small_model():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n, block = 64, 32, 32
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // block, block // 2)   # low nibble first
    inits = [numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32) / 8, "w"),
             numpy_helper.from_array(packed, "qb"),
             numpy_helper.from_array((rng.random((n, k // block)) / 16 + 0.01).astype(np.float32), "scales")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Gelu", ["h"], ["g"]),
             helper.make_node("Add", ["g", "x"], ["r"]),
             helper.make_node("MatMulNBits", ["r", "qb", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block)]
    graph = helper.make_graph(nodes, "verify", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])


def main() -> int:
    quiet = "--quiet" in sys.argv
    import onnxruntime as ort

    report = {"onnxruntime": ort.__version__, "file": ort.__file__, "providers": ort.get_available_providers()}
    try:
        from qmamba.export.ort_providers import ort_cuda_version, preload_cuda_libraries

        report["built_for_cuda"] = ort_cuda_version(ort)
        report["preloaded"] = [Path(p).name for p in preload_cuda_libraries(ort)]
    except ImportError as exc:
        report["preloaded"] = f"qmamba not importable: {exc}"
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        import onnx

        path = str(Path(tmp) / "verify.onnx")
        onnx.save(small_model(), path)
        want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ok = False
        try:
            so = ort.SessionOptions()
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "profile")
            session = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                                 "CPUExecutionProvider"])
            report["session_providers"] = session.get_providers()
            got = session.run(None, {"x": x})[0]
            events = json.loads(Path(session.end_profiling()).read_text())
            report["nodes"] = sorted({(e["args"]["op_name"], e["args"]["provider"]) for e in events
                                      if e.get("cat") == "Node" and "provider" in e.get("args", {})})
            report["max_abs_diff_vs_cpu"] = float(np.abs(got - want).max())
            on_cuda = all(p == "CUDAExecutionProvider" for _, p in report["nodes"]) and report["nodes"]
            ok = bool(on_cuda) and report["max_abs_diff_vs_cpu"] < 1e-3
        except Exception as exc:  # noqa: BLE001 - the report says what failed
            report["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:400]}"
    report["ok"] = ok
    if not quiet or not ok:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(json.dumps({"ok": ok, "preloaded": report.get("preloaded")}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
