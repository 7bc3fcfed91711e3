"""Suite-wide set-up. Triton kernels run on CPU through Triton's interpreter, which must be switched on before
anything imports triton (the kernel modules decorate at import time), so it is set here, first of all conftests.
On the GPU machine scripts/gpu_check.sh sets QMAMBA_TEST_DEVICE=cuda to run the kernel tests compiled."""

import os

if os.environ.get("QMAMBA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
