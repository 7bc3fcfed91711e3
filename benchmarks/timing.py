"""Timing helpers for the GPU benchmarks: CUDA-graph timing of one call at a time over rotating weight copies.

Every timed call is a node of a captured CUDA graph (so host launch overhead, which differs between Triton,
cuBLAS and bitsandbytes, is not measured); consecutive calls use different weight copies, enough of them that the
set exceeds the 50 MB L2 twice over. The reported figure is the median over several replays of (graph time / calls).
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

from qmamba.devices import foreign_gpu_bytes, format_bytes

L2_BYTES = 60 * 2 ** 20  # the H200's (KINDS.md: 60 MB); the H100 has 50 MB
EAGER_FALLBACKS: list[str] = []  # why each time_calls that could not capture its calls timed eager launches instead


def require_idle_gpu() -> None:
    """Exit with status 1 when other processes hold memory of this process's GPU (call before anything else
    allocates there): if they run kernels, every figure of the run is slowed by an unknown share and is not a
    result (session 14 timed ORT and the Triton path beside a distillation job and had to discard them).
    ``QMAMBA_ALLOW_SHARED_GPU=1`` lets the run go on with a warning; nothing to check without a GPU."""
    if not torch.cuda.is_available():
        return
    shared = foreign_gpu_bytes("cuda")
    if not shared:
        return
    message = f"{format_bytes(shared)} of the GPU's memory is held by other processes"
    if os.environ.get("QMAMBA_ALLOW_SHARED_GPU") == "1":
        print(f"warning: {message}; timing anyway (QMAMBA_ALLOW_SHARED_GPU=1): the figures are not results",
              file=sys.stderr)
        return
    sys.exit(f"error: {message}: their kernels would slow every figure by an unknown share. Wait for them to "
             "finish, or set QMAMBA_ALLOW_SHARED_GPU=1 to time anyway")


def copies_for(bytes_per_copy: int, cap: int = 16) -> int:
    """How many weight copies keep a rotation out of L2 (2x its size), at least 2."""
    return max(2, min(cap, -(-2 * L2_BYTES // max(1, bytes_per_copy)) + 1))


def time_calls(fns, reps: int = 5, calls_per_graph: int | None = None, use_graph: bool = True) -> float:
    """Median microseconds per call of ``fns`` (a list of zero-argument callables, one per weight copy)."""
    calls = calls_per_graph or max(len(fns), 8)
    seq = [fns[i % len(fns)] for i in range(calls)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up: compiles, autotunes, allocates
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = None
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for fn in seq:
                    fn()
        except Exception as exc:  # noqa: BLE001 - not capturable: time back-to-back launches instead, and say so
            graph = None
            torch.cuda.synchronize()
            EAGER_FALLBACKS.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            print(f"warning: timing: CUDA-graph capture failed ({EAGER_FALLBACKS[-1]}); this figure times eager "
                  "launches, host overhead included", file=sys.stderr, flush=True)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for fn in seq:
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 2 ** 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)], reps=7, calls_per_graph=4)
    return 2 * n_bytes / (us * 1e-6)


def event_us(event) -> float:
    """GPU microseconds of one profiler event (``device_time`` in newer PyTorch, ``cuda_time`` before)."""
    return event.device_time if hasattr(event, "device_time") else event.cuda_time


def cuda_kernel_times(prof) -> dict:
    """``{kernel name: [launches, GPU microseconds]}`` over a ``torch.profiler`` run's CUDA events."""
    per_name: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            calls_us = per_name.setdefault(event.name, [0, 0.0])
            calls_us[0] += 1
            calls_us[1] += event_us(event)
    return per_name


def kernel_launch_us(prof, name: str) -> list[float]:
    """GPU microseconds of each launch of the kernel ``name`` in a ``torch.profiler`` run, in launch order."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name == name]
    return [event_us(e) for e in sorted(events, key=lambda e: e.time_range.start)]
