"""Kernel tests: CPU through the Triton interpreter (tests/conftest.py switches it on) unless
QMAMBA_TEST_DEVICE=cuda (scripts/gpu_check.sh on the GPU machine, compiled kernels, real shapes)."""

import os

import pytest
import torch


@pytest.fixture
def device():
    dev = os.environ.get("QMAMBA_TEST_DEVICE", "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("QMAMBA_TEST_DEVICE=cuda but no GPU")
    return torch.device(dev)
