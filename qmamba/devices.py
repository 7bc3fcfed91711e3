"""What this machine can run: device names checked against the hardware, the backend against the device, and a
model's weight memory against the device's memory, each a one-line :class:`UserError` before any allocation.

    device = resolve_device("cuda:1")          # torch.device, or UserError ("this machine has 1 CUDA device")
    check_backend("triton", device)            # UserError on CPU unless TRITON_INTERPRET=1
    check_fits(n_bytes, device, "the model")   # UserError when n_bytes exceeds the device's total memory
    foreign_gpu_bytes(device)                  # memory of the GPU held by other processes (timing hygiene)
"""

from __future__ import annotations

import os

import torch

from qmamba.errors import UserError

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


class DeviceError(UserError, ValueError):
    """A device, backend or memory demand this machine cannot satisfy."""


def parse_device(device) -> torch.device:
    """A device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``) or ``torch.device`` of a supported type; the hardware is
    not consulted (see :func:`resolve_device`)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError, TypeError):
            raise DeviceError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in SUPPORTED_DEVICE_TYPES:
        raise DeviceError(f"device {str(dev)!r} is not supported: qmamba runs on cpu or cuda")
    return dev


def resolve_device(device=None) -> torch.device:
    """``device`` (``None`` -> CPU, a name such as ``"cuda:1"``, or a ``torch.device``) checked against this
    machine: the type must be cpu or cuda, CUDA must be available and the index must exist."""
    if device is None:
        return torch.device("cpu")
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"device {str(dev)!r} requested but {why}; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
    return dev


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str, device: torch.device) -> None:
    """The Triton backend needs CUDA (or the Triton interpreter on CPU) and an importable ``triton``."""
    if backend != "triton":
        return
    if device.type != "cuda" and not triton_interpreter_on():
        raise DeviceError(f"--backend triton runs on CUDA only, not on {device.type}; use --backend reference "
                          "(the default on CPU)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise DeviceError("--backend triton needs the 'triton' package, which is not installed; "
                          "use --backend reference") from None


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (physical RAM for CPU), or ``None`` when it cannot be told."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


CUDA_CONTEXT_ALLOWANCE = 1 << 30  # this process's CUDA context (and library workspaces) outside torch's allocator


def foreign_gpu_bytes(device) -> int:
    """Bytes of ``device``'s memory in use that this process's torch allocator does not hold, less an allowance of
    :data:`CUDA_CONTEXT_ALLOWANCE` for this process's own CUDA context: memory of other processes (or of allocators
    in this process other than torch's, such as onnxruntime's: call it before those start). Another process that
    holds GPU memory may also be running kernels, and then every time measured here is slowed by an unknown share.
    0 on the CPU or when the driver cannot be asked."""
    dev = parse_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    try:
        free, total = torch.cuda.mem_get_info(dev)
    except (RuntimeError, AssertionError):
        return 0
    return max(0, total - free - torch.cuda.memory_reserved(dev) - CUDA_CONTEXT_ALLOWANCE)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits(n_bytes: int, device: torch.device, what: str) -> None:
    """Refuse ``n_bytes`` of ``what`` on ``device`` when it exceeds the device's total memory (before allocating)."""
    total = device_memory_bytes(device)
    if total is not None and n_bytes > total:
        where = "this machine's RAM" if device.type == "cpu" else f"{device}'s memory"
        raise DeviceError(f"{what} needs {format_bytes(n_bytes)}, more than {where} ({format_bytes(total)})")
