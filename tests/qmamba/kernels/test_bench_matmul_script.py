"""benchmarks/bench_matmul.py, the command behind issue 13's int4-against-cuBLAS table: its CPU smoke run checks
every method at every M (the int4 path as the runtime dispatches it, the bf16 baselines, the routed stacks), its
check tells the int4 path from the float weight it came from, and its table computes the speedups and verdicts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_matmul as bm  # noqa: E402

from qmamba.kernels.decode_policy import DecodePolicy  # noqa: E402


@pytest.mark.skipif(os.environ.get("QMAMBA_TEST_DEVICE") == "cuda", reason="the CPU interpreter smoke run")
def test_quick_run_checks_every_method(tmp_path):
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_matmul.py"), "--quick", "--experts",
                           "--json", str(out)], capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    checked = [r for r in rows if "check_ok" in r]
    assert checked and all(r["check_ok"] for r in checked)
    seen = {(r["shape"], r["method"], r["m"]) for r in checked}
    for shape in bm.QUICK_SHAPES:
        for m in bm.QUICK_M:
            assert {(shape, "cublas_bf16", m), (shape, "int4_g128", m)} <= seen
    assert ("fc2 x8", "bf16_ours", 20) in seen and ("fc2 x8", "int4_g128", 1) in seen
    # peers need CUDA: reported unavailable, not as figures and not as failures
    assert {r["method"] for r in rows if "unavailable" in r} == set(bm.PEERS)


@pytest.mark.parametrize("m", [1, 3])
def test_check_tells_int4_from_its_float_weight(m, device):
    """The int4 method passes against its own dequantized weight and fails against the float weight it was
    quantized from (the quantization error is far above the 1e-2 limit), so the check can fail."""
    policy = DecodePolicy.for_device(device)
    k, n = bm.QUICK_SHAPES["in_proj"]
    methods = bm.build_methods(k, n, device, (), policy, timing=False)
    int4, bf16 = methods["int4_g128"], methods["cublas_bf16"]
    x = torch.randn(m, k, device=device)
    got = int4.run(x, 0)
    assert bm.rel_err(got, bm.reference(x, int4)) < bm.TOL
    assert bm.rel_err(got, bm.reference(x, bf16)) > 3 * bm.TOL  # int4 g128 RTN: ~0.1
    assert bm.rel_err(torch.full_like(got, float("nan")), bm.reference(x, int4)) == float("inf")


def test_small_m_rows_write_the_step_workspace(device):
    """At 2..16 rows the int4 method writes a float32 workspace made outside the timed call, as the fused step's
    general kernels do (split-K adds into it); ``--small-m-tiles`` candidates likewise, only at 2..16 rows; a
    malformed tile is refused."""
    policy = DecodePolicy.cuda(4, False)  # the CUDA policy (without PDL): 2+ dense rows on the general kernels
    k, n = bm.QUICK_SHAPES["fc2"]
    methods = bm.build_methods(k, n, device, (), policy, timing=False, small_m_tiles=("16x32k2w4s3",))
    x = torch.randn(3, k, device=device)
    for name in ("int4_g128", "int4_sm_16x32k2w4s3"):
        method = methods[name]
        prepared = method.prepare(x)
        ws = prepared["out"] if isinstance(prepared, dict) else prepared
        assert ws.dtype == torch.float32 and not ws.any()
        got = method.run(x, 0, None, prepared)
        assert got.data_ptr() == ws.data_ptr() and bm.rel_err(got, bm.reference(x, method)) < bm.TOL
    assert methods["int4_sm_16x32k2w4s3"].rows == (2, 16)
    assert bm.parse_tile("16x32k2w8s4") == bm.MatmulConfig(16, 32, 128, 2, 8, 4)
    with pytest.raises(ValueError, match="expected"):
        bm.parse_tile("16x32w4")
    result = dict(failures=[])
    rows = bm.bench_shape("fc2", k, n, [1, 3], device, torch.float32, (), policy, result, False,
                          small_m_tiles=("16x32k1w4s3",))
    assert not result["failures"]
    assert {(r["method"], r["m"]) for r in rows if r["method"] == "int4_sm_16x32k1w4s3"} == {("int4_sm_16x32k1w4s3", 3)}


def test_table_speedups_and_targets():
    rows = [dict(shape="in_proj", m=m, method=name, us=us) for m, name, us in
            [(8, "cublas_bf16", 7.8), (8, "int4_g128", 13.0), (2048, "cublas_bf16", 52.0), (2048, "int4_g128", 50.0),
             (1, "cublas_bf16", 8.0), (1, "int4_g128", 4.0)]]
    text = bm.table(rows, "cublas_bf16")
    lines = {line.split("|")[2].strip(): line for line in text.splitlines()[2:]}
    assert "0.60x" in lines["8"] and ">= 1.5: missed" in lines["8"]
    assert "1.04x" in lines["2048"] and ">= 0.95: met" in lines["2048"]
    assert "2.00x" in lines["1"] and lines["1"].rstrip().endswith("| - |")
    assert bm.table([r for r in rows if r["method"] != "int4_g128"], "cublas_bf16") == ""
