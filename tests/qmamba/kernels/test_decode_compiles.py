"""The decode linear kernel as the CUDA policy launches it compiles for sm_90 (Triton's own ptxas, no GPU) at every
BlackMamba-2.8B shape, for int4 plane words and float weights, without a stack frame (spills). The interpreter runs
the kernels' arithmetic but never the compiler: this catches what only the compiler rejects, and a register blow-up
of the default path, on a machine without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_cuda_default_compiles_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))  # compiled, not interpreted
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inspect_decode_kernel.py"),
                          "--variants", "cuda_default,cuda_default_float", "--no-stack"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if " regs " in line]
    assert len(lines) == 12, run.stdout  # 6 shapes x 2 weight forms
    assert all(" stack    0 " in line for line in lines), run.stdout
