"""benchmarks/bench_scan.py, the command behind the scan figures of benchmarks/results.md: its knob sets parse as
documented, and its CPU smoke run (tiny shapes, every variant checked against the sequential reference) passes with
extra knob sets of both methods and in the profiling mode (no timing table)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scan import parse_knobs  # noqa: E402


def test_knob_sets_parse():
    assert parse_knobs("lanes=2;method=assoc,block_t=64") == [{"lanes": 2}, {"method": "assoc", "block_t": 64}]
    assert parse_knobs(" fast_exp=true ; bc_fp32=False,n_segments=-1;") == [{"fast_exp": True},
                                                                           {"bc_fp32": False, "n_segments": -1}]
    assert parse_knobs("") == []


@pytest.mark.skipif(os.environ.get("QMAMBA_TEST_DEVICE") == "cuda",
                    reason="the CPU interpreter smoke run: with the H200 image's Triton 3.6 and numpy the "
                           "interpreter fails every scan kernel ('only 0-dimensional arrays' TypeError); the GPU "
                           "runs the script itself")
def test_quick_run_checks_every_variant(tmp_path):
    for extra in ([], ["--profile", "1"]):
        out = tmp_path / f"scan{len(extra)}.json"
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scan.py"), "--quick", "--json",
                               str(out), "--knobs", "n_segments=3;method=assoc,block_t=8", *extra],
                              capture_output=True, text=True, timeout=900,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        rows = json.loads(out.read_text())["rows"]
        assert {r["variant"] for r in rows} == {"assoc", "chunked", "chunked n_segments=3", "assoc block_t=8"}
        assert all(r["check_ok"] for r in rows)
        assert ("floor = bytes" in done.stdout) == (not extra)  # the timing table, not when profiling
        assert all(("us" in r) == (not extra) for r in rows)
