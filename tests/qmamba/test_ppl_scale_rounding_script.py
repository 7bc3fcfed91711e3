"""benchmarks/ppl_scale_rounding.py, the command behind session 34's accuracy figure for the scaled int4 pairs
(``MatmulPolicy.plane_code_pairs``): on a short held-out prefix it quantizes the shipped model, rounds the second
checkpoint's scales to bfloat16 (and only those: the rounded tensors differ from the first checkpoint's, everything
else is equal) and prints the three perplexities."""

import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_script_rounds_only_the_scales_and_reports(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ppl_scale_rounding.py"), "--max-tokens",
                           "1024", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ppl = [float(v) for v in re.findall(r"perplexity ([0-9.]+)\n", done.stdout)]
    assert len(ppl) == 3 and all(p > 1 for p in ppl), done.stdout
    from safetensors.torch import load_file

    exact = load_file(tmp_path / "int4_g128" / "model.safetensors")
    rounded = load_file(tmp_path / "int4_g128_bf16_scales" / "model.safetensors")
    assert exact.keys() == rounded.keys()
    scales = [k for k in exact if k.endswith("scales")]
    assert scales
    for k, v in exact.items():
        if k in scales:
            torch.testing.assert_close(rounded[k], v.to(torch.bfloat16).to(torch.float16), rtol=0, atol=0)
        else:
            assert torch.equal(rounded[k], v), k
    assert any(not torch.equal(rounded[k], exact[k]) for k in scales)
