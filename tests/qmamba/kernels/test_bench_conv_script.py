"""benchmarks/bench_conv.py, the command behind the prefill conv's tile figures: tiles parse as documented, a bad
one is refused, and its CPU smoke run (tiny shapes, every tile checked against the reference) passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_conv import parse_tile  # noqa: E402


def test_tiles_parse():
    assert parse_tile("default") == {}
    assert parse_tile("64x128w4") == dict(block_l=64, block_d=128, num_warps=4)
    with pytest.raises(SystemExit, match="BLOCK_LxBLOCK_DwWARPS"):
        parse_tile("64x128")


@pytest.mark.skipif(os.environ.get("QMAMBA_TEST_DEVICE") == "cuda", reason="the CPU interpreter smoke run")
def test_quick_run_checks_every_tile(tmp_path):
    out = tmp_path / "conv.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_conv.py"), "--quick", "--json", str(out),
                           "--tiles", "default,32x8w1,4x16w1"], capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["tile"] for r in rows} == {"default", "32x8w1", "4x16w1"} and len(rows) == 6
    assert all(r["check_ok"] for r in rows)
