"""The quantization methods, in one registry: what ``--method`` and a recipe's ``method`` may name, what each needs
from the calibration walk, and how it turns a weight matrix into codes.

    METHODS["gptq"].needs_hessian         # the walk accumulates the input Hessian
    METHODS["awq"].searches_scales        # the walk searches input scales and folds them where that is exact
    METHODS[name].solve(W, fmt, cap, opts, x_used) -> (q, scale, zero) | None
    METHODS["gptq"].solve_stack(Ws, fmt, caps, opts) -> [(q, scale, zero) | None] * E   # MoE experts at once
    METHODS["rtn"].needs_data             # False: rtn and ptb quantize without calibration text

``solve`` returns ``None`` when the method cannot run on what the walk captured (no tokens, non-finite statistics,
a GPTQ Cholesky failure): the matrix then gets its format's data-free initialisation, round to nearest (``rtn``)
or, for the 1-bit format, post-training binarization (``ptb``), and the walk records that fallback. ``rtn`` and
``ptb`` are that initialisation themselves (``solve is None``); ``ptb`` is not selectable: the binary format picks
it whatever method was asked for (GPTQ and AWQ do not apply to signs). ``solve_stack``, where a method has one,
solves a stack of matrices ``Ws [E, N, K]`` (the experts of one MoE linear, one capture each) in one go, with the
results and ``None``s that ``solve`` gives on each matrix.

This module imports no torch at import time (the CLI reads :data:`SELECTABLE_METHODS` for its choices).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("qmamba.calib")


def _gptq_hessian(cap):
    """The Hessian GPTQ can run on, or ``None`` (no Hessian captured, no tokens, non-finite statistics)."""
    if cap is None or cap.hessian is None or cap.n_tokens == 0:
        return None
    H = cap.hessian.hessian()
    return H if H.isfinite().all() else None


def _gptq(W, fmt, cap, opts, x_used):
    from qmamba.calib.gptq import GPTQFailure, gptq_quantize

    H = _gptq_hessian(cap)
    if H is None:
        return None
    try:
        return gptq_quantize(W, H, fmt, opts.block_size, opts.damp, opts.act_order)
    except GPTQFailure:
        log.warning("GPTQ failed (Hessian not positive definite): RTN used")
        return None


def _gptq_stack(Ws, fmt, caps, opts):
    """GPTQ of the stack ``Ws [E, N, K]`` with ``caps[e]``'s Hessian for matrix ``e``: one column loop for all the
    matrices that have a usable Hessian (:func:`qmamba.calib.gptq.gptq_quantize_batched`)."""
    import torch

    from qmamba.calib.gptq import gptq_quantize_batched

    hessians = [_gptq_hessian(cap) for cap in caps]
    usable = [e for e, H in enumerate(hessians) if H is not None]
    results = [None] * len(caps)
    if not usable:
        return results
    W_usable = Ws if len(usable) == len(caps) else Ws[usable]
    H_usable = torch.stack([hessians[e] for e in usable])
    del hessians
    solved = gptq_quantize_batched(W_usable, H_usable, fmt, opts.block_size, opts.damp, opts.act_order)
    for e, result in zip(usable, solved):
        if result is None:
            log.warning("GPTQ failed for matrix %d of the stack (Hessian not positive definite): RTN used", e)
        results[e] = result
    return results


def _awq(W, fmt, cap, opts, x_used):
    from qmamba.calib.awq import quantize_with_clip, search_clip

    if x_used is None or x_used.shape[0] == 0 or not x_used.isfinite().all():
        return None
    return quantize_with_clip(W, search_clip(W, x_used, fmt, opts.awq_grid), fmt)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    solve: Callable | None = None     # None: the format's data-free initialisation
    solve_stack: Callable | None = None  # a stack of matrices at once (None: solve each)
    needs_hessian: bool = False       # capture the input Hessian (GPTQ)
    searches_scales: bool = False     # search input scales, fold them where exact, search clipping (AWQ)
    selectable: bool = True           # by --method / a recipe (False: chosen by the format)
    needs_data: bool = False          # calibration text is read (rtn and ptb quantize data-free)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "round to nearest, no calibration statistics"),
    Method("gptq", "GPTQ: error-compensating rounding column by column with the input Hessian", _gptq,
           solve_stack=_gptq_stack, needs_hessian=True, needs_data=True),
    Method("awq", "AWQ: activation-aware input scales (folded where exact) and clipping search", _awq,
           searches_scales=True, needs_data=True),
    Method("ptb", "1-bit post-training binarization from column statistics (the binary format's own)",
           selectable=False),
)}
SELECTABLE_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.selectable)


def data_free_method(fmt) -> str:
    """The name of ``fmt``'s statistics-only initialisation: ``"ptb"`` for the binary format, else ``"rtn"``."""
    return getattr(fmt, "data_free_method", None) or "rtn"
