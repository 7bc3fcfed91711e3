"""benchmarks/ncu_decode_step.py's summary of an ncu CSV (``--csv --page raw``): one line a kernel, the stalls
ordered, and a clear error for a file with no table. No GPU: a small CSV written here in ncu's shape."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ncu_decode_step  # noqa: E402


def _write(path, rows):
    header = ["ID", "Kernel Name", "Grid Size"] + list(ncu_decode_step.METRICS)
    with open(path, "w", newline="") as f:
        f.write("==PROF== Connected to process 1\n")  # ncu's own lines come before the table
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(header)
        w.writerow(["", "", ""] + ["unit"] * len(ncu_decode_step.METRICS))
        for row in rows:
            w.writerow([row.get(h, "0") for h in header])


def test_summary_one_line_a_kernel_with_its_largest_stalls(tmp_path):
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio".format
    _write(tmp_path / "s.csv", [
        {"ID": "0", "Kernel Name": "_decode_linear_kernel", "Grid Size": "(1, 736, 1)",
         "gpu__time_duration.sum": "7,550", "dram__bytes_read.sum": "4770000", "launch__registers_per_thread": "62",
         stall("long_scoreboard"): "12.3", stall("barrier"): "0.4", stall("wait"): "1.1", stall("selected"): "1.0",
         stall("membar"): "2.5"},
        {"ID": "1", "Kernel Name": "_dt_state_update_kernel", "Grid Size": "(1, 368, 1)"}])
    lines = ncu_decode_step.summary(str(tmp_path / "s.csv"))
    assert len(lines) == 2
    first = lines[0]
    assert "_decode_linear_kernel" in first and "(1, 736, 1)" in first and "7.55 us" in first and "4.77 MB" in first
    stalls = first.split("stalls ")[1].split()
    assert stalls == ["long_scoreboard=12.3", "membar=2.5", "wait=1.1", "selected=1.0"]
    assert "_dt_state_update_kernel" in lines[1]


def test_summary_of_a_file_without_a_table_fails_clearly(tmp_path):
    (tmp_path / "e.csv").write_text("==ERROR== the profiler could not start\n")
    with pytest.raises(SystemExit, match="no ncu CSV table"):
        ncu_decode_step.summary(str(tmp_path / "e.csv"))
