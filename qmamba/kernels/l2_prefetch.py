"""L2 prefetch of a later kernel's weights, issued by an earlier kernel's programs (Hopper's bulk prefetch).

A decode step reads each weight once, and the whole step's weights (~0.3-0.45 GB for BlackMamba-2.8B) do not stay in
L2 between steps, so every GEMV's first loads wait on DRAM; the programs of a grid that does not fit on the GPU at
once (int4 in_proj at batch 1: ~1,500 programs against ~1,000 resident) load theirs only when the first wave leaves.
A kernel that runs a few launches earlier can ask L2 for those bytes instead (``cp.async.bulk.prefetch.L2``: a
hint, no registers, no result, nothing to wait for), so the later loads find them there.

:func:`prefetch_l2` spreads one byte range over a grid: each program issues one bulk prefetch per warp (lane 0 of
each) of its share (:func:`prefetch_chunk`, computed on the host), 16-byte aligned. It changes no result, so it is tested by the results of the
kernels that carry it on the GPU; the Triton interpreter has no inline assembly, so callers gate it behind a
``constexpr`` that is off on CPU (:class:`qmamba.kernels.decode_linear.DecodePolicy`'s ``l2_prefetch``).
:func:`prefetch_range` is the host side: the ``(tensor, bytes)`` of a weight's packed words to hand to a kernel.
"""

from __future__ import annotations

import torch

from qmamba.kernels._triton import jit, tl

PREFETCH_ALIGN = 16  # bytes: the bulk prefetch's address and size granularity


@jit
def prefetch_l2(ptr, nbytes, chunk, part, NT: tl.constexpr):
    """Prefetch program ``part``'s share of the bytes ``[ptr, ptr + nbytes)`` into L2: lane 0 of each of its warps
    (``NT = 32 * num_warps`` threads) one bulk prefetch of ``chunk`` bytes (:func:`prefetch_chunk`: the range over
    the grid's warps, a multiple of 16), clipped at the end. ``ptr`` is 16-byte aligned, ``nbytes`` a multiple of 16."""
    t = tl.arange(0, NT)
    start = (part * (NT // 32) + t // 32).to(tl.int64) * chunk
    size = tl.where(t % 32 == 0, tl.minimum(nbytes - start, chunk), 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_chunk(nbytes: int, programs: int, warps: int) -> int:
    """Bytes each warp of a grid of ``programs`` x ``warps`` prefetches to cover ``nbytes`` (a multiple of 16)."""
    per = -(-nbytes // (programs * warps))
    return -(-per // PREFETCH_ALIGN) * PREFETCH_ALIGN


def prefetch_range(weight) -> tuple[torch.Tensor, int] | None:
    """``(tensor, nbytes)``: the stored weight of a kernel weight record (``qweight`` of a ``PackedWeight`` or a
    ``BinaryWeight``: codes, plane words, sign words or float values; not the scales), the size rounded down to 16
    bytes; None where there is nothing to prefetch or the storage is not 16-byte aligned."""
    t = getattr(weight, "qweight", None)
    if t is None or not t.is_contiguous() or t.data_ptr() % PREFETCH_ALIGN:
        return None
    nbytes = t.numel() * t.element_size() // PREFETCH_ALIGN * PREFETCH_ALIGN
    return (t, nbytes) if nbytes else None
