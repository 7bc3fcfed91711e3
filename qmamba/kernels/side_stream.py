"""Work started early on a second CUDA stream, so that it runs beside a kernel that leaves most of the GPU idle.

In a prefill the MoE's tile map is one program, and the W4A8 experts' input quantizer, which needs only the
block's input, would otherwise wait for it on the one stream. Inside :func:`side_work` a producer :func:`issue`-s
such a result early: its buffers are allocated on the current stream, then its kernel is queued on the side
stream behind everything the current stream has queued so far (a fork); the consumer :func:`take`-s it by the same
key, which makes the current stream wait for the side stream's event first (a join). Leaving the scope joins
whatever was not taken, so a CUDA graph captured over it (the graph prefill) ends with every fork joined.

Buffers come from the current stream's allocator pool and the side stream only writes them, so a buffer freed
after its consumer cannot be handed to the side stream while the consumer still reads it (no ``record_stream``,
which defers frees to the end of a graph capture). Off CUDA there is no side stream: :func:`side_work` then yields
None and :func:`issue` does nothing, unless ``inline=True`` (tests), which runs the work on the spot and keeps the
bookkeeping.

Tried and removed (session 42, H100, graph prefill of 2,048 tokens, ``profile_prefill.py --format int4_cli --graph
--experts tiles,tiles_noside``): the dense projections' dequantization passes on the side stream. Forked as each
Mamba mixer started, they ran beside its GEMMs and conv, which leave them no room: 178.2k against 178.9k tok/s in
line. Forked just before the scan, they slowed it more than they saved (the scan's 36 launches 2,534 -> 2,850 us
against the passes' 263): 175.3k against 178.6k. The memory-bound pass raises the latency the scan waits on.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Hashable
from contextlib import contextmanager

import torch

_ACTIVE: contextvars.ContextVar["SideWork | None"] = contextvars.ContextVar("qmamba_side_work", default=None)
_STREAMS: dict = {}  # device index -> the side stream (one per device, reused by every scope)


class SideWork:
    """One scope's results issued on the side stream and not yet taken (see the module docstring)."""

    def __init__(self, device: torch.device, inline: bool = False):
        self.device = device
        self.stream = None if inline else _side_stream(device)
        self._pending: dict = {}  # key -> (buffers, event or None)
        self.issued = 0
        self.taken = 0

    def issue(self, key: Hashable, alloc: Callable[[], object], launch: Callable[[object], None]) -> None:
        """``alloc()`` on the current stream, then ``launch(buffers)`` on the side stream behind the current
        stream's queued work (a fork here); a key issued twice keeps its first result."""
        if key in self._pending:
            return
        buffers = alloc()
        event = None
        if self.stream is None:
            launch(buffers)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                launch(buffers)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending[key] = (buffers, event)
        self.issued += 1

    def take(self, key: Hashable):
        """The buffers issued under ``key`` (the current stream now waits for them), or None."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return None
        buffers, event = entry
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.taken += 1
        return buffers

    def join(self) -> None:
        """The current stream waits for everything issued and not taken; the results are dropped."""
        for _, event in self._pending.values():
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        self._pending.clear()

    @property
    def pending(self) -> int:
        """Results issued and not taken."""
        return len(self._pending)


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


@contextmanager
def side_work(device: torch.device, enabled: bool = True, inline: bool = False):
    """A scope in which :func:`issue` / :func:`take` use a side stream of ``device`` (CUDA; elsewhere, or when not
    ``enabled``, the scope is inactive and yields None; ``inline``: any device, the work runs where it is issued).
    On leaving, the current stream joins everything not taken. Scopes nest: the inner one is active inside it."""
    device = torch.device(device)
    if not enabled or (device.type != "cuda" and not inline):
        yield None
        return
    work = SideWork(device, inline=inline or device.type != "cuda")
    token = _ACTIVE.set(work)
    try:
        yield work
    finally:
        _ACTIVE.reset(token)
        work.join()


def active() -> SideWork | None:
    """The innermost active :func:`side_work` scope, or None."""
    return _ACTIVE.get()


def issue(key: Hashable, alloc: Callable[[], object], launch: Callable[[object], None]) -> bool:
    """:meth:`SideWork.issue` in the active scope; False (nothing done) when none is active."""
    work = _ACTIVE.get()
    if work is None:
        return False
    work.issue(key, alloc, launch)
    return True


def take(key: Hashable):
    """:meth:`SideWork.take` in the active scope, or None."""
    work = _ACTIVE.get()
    return None if work is None else work.take(key)
