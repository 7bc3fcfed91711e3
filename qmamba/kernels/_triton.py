"""Optional Triton import shared by the kernel files.

Triton is a Linux dependency, but the pure-PyTorch references must import (and run) without it. Kernel files do
``from qmamba.kernels._triton import triton, tl, jit``. On CPU the kernels run through Triton's interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported (tests/conftest.py sets it). Without
Triton, ``jit`` returns a stub that raises a clear error when a kernel is launched, and ``HAS_TRITON`` is False.
"""

from __future__ import annotations

try:  # pragma: no cover - exercised by the environment, not by tests
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice  # CUDA's device functions (compiled kernels only)

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # pragma: no cover
    triton = None
    libdevice = None
    HAS_TRITON = False

    class _Missing:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not installed: kernel {self.name} cannot run (use backend='reference')")

    class _TL:  # annotations and constants used at definition time
        constexpr = object

        def __getattr__(self, name):
            return None

    tl = _TL()

    def jit(fn=None, **_kwargs):
        if fn is None:
            return lambda f: _Missing(f.__name__)
        return _Missing(fn.__name__)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids and tile counts (host side)."""
    return -(-int(a) // int(b))


def pdl_launch(pdl: bool) -> dict:
    """A kernel launch's options for a programmatic dependent launch (Hopper and newer; the kernel itself waits with
    ``gdc_wait`` before it reads what the kernel before it wrote), or none."""
    return dict(launch_pdl=True) if pdl else {}


def split_k_mode(atomic: bool, sem: str) -> int:
    """A matmul's ``ATOMIC`` for :func:`store_or_add`: 0 a plain store, 1 a relaxed atomic add (split-K), 2 an
    acq_rel one (``sem``: ``MatmulPolicy.split_k_atomic_sem``, which checks its value)."""
    return (2 if sem == "acq_rel" else 1) if atomic else 0


@jit
def store_or_add(ptrs, val, mask, ATOMIC: tl.constexpr):
    """A matmul's output: stored (``ATOMIC`` 0), or under split-K added into a zeroed fp32 buffer (1 relaxed, 2
    acq_rel; the sums are read after the grid completes, so nothing needs ordering here, and acq_rel fences every
    earlier store before each add: ``MEMBAR.ALL.GPU`` + ``CCTL.IVALL`` on sm_90)."""
    if ATOMIC == 2:
        tl.atomic_add(ptrs, val, mask=mask, sem="acq_rel")
    elif ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@jit
def split_k_range(pid_k, iters, SPLIT_K):
    """``[lo, hi)``: the iterations (of ``iters`` along K) that split ``pid_k`` of ``SPLIT_K`` runs (inside kernels)."""
    per_split = tl.cdiv(iters, SPLIT_K)
    lo = pid_k * per_split
    return lo, tl.minimum(lo + per_split, iters)
