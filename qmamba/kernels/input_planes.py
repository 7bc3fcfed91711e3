"""Kernel-side helpers of the int4 input planes (the layout and its reference:
:data:`qmamba.quant.layout.INT4_X_PLANES`, :func:`qmamba.quant.layout.int4_x_planes`): the per-position scale, and the
store every producer of a plane-word GEMV's input calls (add + norm, the SSM update, fc1's epilogue in
:mod:`qmamba.kernels.decode_linear`)."""

from __future__ import annotations

from qmamba.kernels._triton import jit, tl


@jit
def x_plane_scale(i: tl.constexpr):
    """``2^(96 - 4p)``, the power of two the input of nibble ``i`` is scaled by for its subnormal code (p = i % 5, the
    nibble's position in ``w`` or ``w >> 20``): input planes (:func:`qmamba.quant.layout.int4_x_plane_scale`)."""
    return 2.0 ** (96 - 4 * (i % 5))


@jit
def store_x_planes(ptr, cols, xf, mask, KPAD: tl.constexpr):
    """Planes 0..7 of the int4 input planes (:data:`qmamba.quant.layout.INT4_X_PLANES`, ``KPAD`` columns a plane)
    of the fp32 values ``xf`` at columns ``cols`` (any shape): nibble i sits at bit 4 (i % 5) of w (i < 5) or of
    w >> 20. Producers of a plane-word GEMV's input call it (add + norm, the SSM update, fc1's epilogue)."""
    for i in tl.static_range(8):
        tl.store(ptr + i * KPAD + cols, xf * x_plane_scale(i), mask=mask)


@jit
def add_word_sums(sums_ptr, cols, xf, mask):
    """Plane 8 of the int4 input planes (the word sums) built by the producers themselves: each fp32 value ``xf`` at
    column ``cols`` (any shape) adds ``2^-53 x`` into the sum of its word, ``16 (col // 128) + col % 16``, in the
    row at ``sums_ptr`` (zeroed before its producer runs). Relaxed: the consumer reads the row after this grid
    completes, so nothing needs ordering (acq_rel would fence every store first)."""
    tl.atomic_add(sums_ptr + (cols // 128) * 16 + cols % 16, xf * (2.0 ** -53), mask=mask, sem="relaxed")
