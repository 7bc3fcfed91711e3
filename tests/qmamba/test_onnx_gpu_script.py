"""benchmarks/bench_onnx_gpu.py (behind scripts/ort_gpu_check.sh) in its CPU dry run: the torch and ort phases
split over two runs sharing the work folder, as two calls of the GPU machine run them; the report it writes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_onnx_gpu", REPO / "benchmarks" / "bench_onnx_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_onnx_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_dry_run_in_two_phases(tmp_path, monkeypatch):
    bench = load_script()
    monkeypatch.setattr(sys, "argv", ["bench_onnx_gpu.py"])
    common = ["--cpu", "--quick", "--work", str(tmp_path / "work"), "--triton-all", "--cuda-graph-variants",
              "mamba-fp32", "--tokens", "2", "--check-tokens", "4", "--prompt-len", "8"]
    variants = ["--variants", "mamba-fp32,big-binary"]
    assert bench.main(common + variants + ["--out", str(tmp_path / "a"), "--phase", "torch"]) == 0
    assert (tmp_path / "work" / "big-binary" / "model.onnx").is_file()
    variants = ["--variants", "mamba-fp32,big-binary,big-int8"]  # big-int8: not exported by the torch phase
    assert bench.main(common + variants + ["--out", str(tmp_path / "b"), "--phase", "ort"]) == 0
    result = json.loads((tmp_path / "b" / "onnx_gpu.json").read_text())
    assert result["failures"] == [] and list(result["variants"]) == ["mamba-fp32", "big-binary"]
    assert result["skipped"] == [f"big-int8: no export in {tmp_path / 'work'} (the torch phase did not reach it)"]
    for record in result["variants"].values():
        assert record["check"]["ok"] and record["check"]["greedy_tokens_equal"]
        assert record["provider"] == "CPUExecutionProvider" and record["nodes_off_provider"] == {}
        assert record["ort"]["decode_ms"] > 0 and record["triton"]["decode_ms"] > 0  # the torch phase's figure
    half = result["variants"]["big-binary"]["check"]["torch_half"]  # fp16 export: PyTorch float16 twin measured
    assert half["positions"] == result["variants"]["big-binary"]["check"]["positions"]
    assert result["variants"]["mamba-fp32"]["check"]["torch_half"] is None
    graph = result["variants"]["mamba-fp32"]["cuda_graph"]
    assert not graph["ok"] and "needs --device cuda" in graph["error"]  # the subprocess ran and reported
    table = (tmp_path / "b" / "onnx_gpu.md").read_text()
    assert "| mamba-fp32 | tiny-mamba | float | fp32 |" in table and "| big-binary | tiny-blackmamba |" in table
    assert "PyTorch float16: err max" in table


def test_fp16_exports_are_held_to_the_float16_twin():
    bench = load_script()
    fp16 = bench.VARIANTS["big-int4"]
    stats = {"positions": 47, "positions_beyond_tol": 7, "top1_mismatches_beyond_ties": 0}
    assert bench.check_passes(stats, None, fp16) == (False, 0.1 * 47)           # 7 > 10% of 47
    assert bench.check_passes(stats, {"positions_beyond_tol": 5}, fp16) == (True, 7)
    assert not bench.check_passes(stats, {"positions_beyond_tol": 4}, fp16)[0]
    assert not bench.check_passes({**stats, "top1_mismatches_beyond_ties": 1}, {"positions_beyond_tol": 9}, fp16)[0]
    assert bench.check_passes({**stats, "positions_beyond_tol": 4}, None, fp16)[0]


def test_a_failed_check_exits_non_zero(tmp_path, monkeypatch):
    bench = load_script()
    monkeypatch.setattr(sys, "argv", ["bench_onnx_gpu.py"])
    monkeypatch.setitem(bench.VARIANTS, "mamba-fp32", bench.Variant("tiny-mamba", "float", "fp32", -1.0, 1e-3))
    code = bench.main(["--cpu", "--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                       "--variants", "mamba-fp32", "--cuda-graph-variants", "none", "--no-triton", "--tokens", "2",
                       "--check-tokens", "3"])
    result = json.loads((tmp_path / "o" / "onnx_gpu.json").read_text())
    assert code == 1 and result["failures"][0].startswith("mamba-fp32: check")
    assert "FAILED" in (tmp_path / "o" / "onnx_gpu.md").read_text()
