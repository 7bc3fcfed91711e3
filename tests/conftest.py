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


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="K/N",
                     help="run the K-th of N parts of the collected tests (1-based; every N-th test in collection "
                          "order from the K-th, the same in every xdist worker), so that a long run fits a time limit: "
                          "scripts/gpu_check.sh --shard 1/2, then --shard 2/2")


def _shard(value: str) -> tuple[int, int]:
    try:
        k, n = (int(p) for p in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes K/N with whole numbers, got {value!r}") from None
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard K/N needs 1 <= K <= N, got {value!r}")
    return k, n


def pytest_collection_modifyitems(config, items):
    value = config.getoption("--shard")
    if not value:
        return
    k, n = _shard(value)
    keep = [item for i, item in enumerate(items) if i % n == k - 1]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % n != k - 1])
    items[:] = keep


_failures_log = {"path": None}


def pytest_configure(config):
    # in the main process only (pytest-xdist's workers send their reports to it, which logs them)
    if not hasattr(config, "workerinput"):
        _failures_log["path"] = os.environ.get("QMAMBA_FAILURES_LOG") or None


def pytest_runtest_logreport(report):
    """QMAMBA_FAILURES_LOG=FILE: each failing test's id (and the phase that failed) appended to FILE as soon as it
    fails, so that a run cut off before pytest's summary (a device call's time limit) still says which failed."""
    path = _failures_log["path"]
    if path and report.failed:
        last_line = (report.longreprtext.strip().splitlines() or [""])[-1][:300]
        with open(path, "a") as f:
            f.write(f"{report.nodeid} ({report.when}) {last_line}\n")
