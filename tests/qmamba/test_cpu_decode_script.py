"""scripts/cpu_quant_decode.py, the command behind the CPU decode figures of benchmarks/onnx_cpu.md, still runs
(issue 15, item 4: the figure must be reproducible by its command; an API rename once broke it with an ImportError)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_cpu_quant_decode_runs_on_the_builtin_model():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "cpu_quant_decode.py"), "--steps", "1",
                           "--rounds", "1", "--threads", "1"], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = dict(re.findall(r"^  (\S+)\s+([0-9.]+) ms/token", done.stdout, re.MULTILINE))
    assert set(rows) == {"fp32", "int4-per-call", "int4-dense-cache", "int4-cpu-int4", "onnx-int4"}, done.stdout
    assert all(float(ms) > 0 for ms in rows.values())
    assert re.search(r"dense cache [0-9.]+ MiB", done.stdout)
