"""scripts/quant_table.py, the command behind the quality tables (docs/quantization.md, issue 17's table), still runs
on the built-in model with the new rows, and what it measures is ordered as it must be (int4 well above 1 bit)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quant_table_runs_int4_route_aware_and_one_bit_rows(tmp_path):
    rows = "int4 g128 RTN,int4 g128 GPTQ route-aware,1-bit PTB,1-bit PTB + block match + distill"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "quant_table.py"), "--only", rows, "--nsamples", "4",
                           "--seq-len", "64", "--eval-tokens", "2048", "--calib", "corpus", "--router-windows", "4",
                           "--block-steps", "10", "--distill-steps", "5",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert set(results) == {"fp32", *rows.split(",")}
    assert results["int4 g128 RTN"]["ppl"] < results["1-bit PTB"]["ppl"]
    assert results["1-bit PTB + block match + distill"]["ppl"] < results["1-bit PTB"]["ppl"]
    assert results["int4 g128 GPTQ route-aware"]["bytes"] > results["int4 g128 RTN"]["bytes"]  # some matrices int8
    assert all(0.0 < r["router"] <= 1.0 for r in results.values())
    assert "| 1-bit PTB |" in (tmp_path / "table.md").read_text()
