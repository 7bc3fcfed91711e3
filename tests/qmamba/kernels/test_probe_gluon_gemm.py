"""benchmarks/probe_gluon_gemm.py (the int4 plane-word GEMM in Gluon with asynchronous tensor-core products) on the
GPU: its output equals x @ the dequantized weight at ragged M, N and K, one matrix and a routed stack. (That it
builds for sm_90 with the products left in flight is checked without a GPU in test_decode_compiles.py.)"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def _probe():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import probe_gluon_gemm

    return probe_gluon_gemm


@pytest.mark.parametrize("config", [(128, 64, 1, 4), (64, 64, 1, 4), (128, 64, 0, 4), (128, 64, 1, 8),
                                    (128, 128, 1, 8), (64, 16, 1, 4), (128, 16, 1, 8)])
def test_matches_the_dequantized_matmul_on_gpu(config, device):
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("Gluon's warpgroup MMA needs a Hopper GPU (scripts/gpu_check.sh)")
    probe = _probe()
    torch.manual_seed(0)
    w = probe.planes_weight(200, 300, device)  # ragged N and K (K padded to 384: three tiles)
    for m in (100, 1):
        x = torch.randn(m, 300, device=device).to(torch.bfloat16)
        ref = x.float() @ w.dequantized(torch.float32)[0].t()
        out = probe.planes_wgmma_matmul(x, w, *config)
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    # the grouped GEMM of a routed stack (one expert idle, a spare tile in the map) with the routing weight
    from qmamba.kernels.quant_matmul import dequant_matmul_ref

    stack = probe.planes_weight(200, 300, device, experts=4)
    x = torch.randn(150, 300, device=device).to(torch.bfloat16)
    idx = torch.randint(0, 3, (150,), device=device, dtype=torch.int32)
    rw = torch.rand(150, device=device) + 0.5
    out = probe.planes_wgmma_matmul(x, stack, *config, row_expert=idx, row_scale=rw)
    ref = dequant_matmul_ref(x, stack, row_expert=idx, row_scale=rw).float()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
