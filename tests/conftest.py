"""Suite-wide set-up. Triton kernels run on CPU through Triton's interpreter, which must be switched on before
anything imports triton (the kernel modules decorate at import time), so it is set here, first of all conftests.
On the GPU machine scripts/gpu_check.sh sets QMAMBA_TEST_DEVICE=cuda to run the kernel tests compiled."""

import os

if os.environ.get("QMAMBA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    """CPU (Triton interpreter) unless QMAMBA_TEST_DEVICE=cuda (compiled kernels on the GPU machine)."""
    dev = os.environ.get("QMAMBA_TEST_DEVICE", "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("QMAMBA_TEST_DEVICE=cuda but no GPU")
    return torch.device(dev)
