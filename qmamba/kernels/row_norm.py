"""The add + norm of one row, as Triton device functions shared by the kernels that end with it.

:func:`qmamba.kernels.decode_step.add_norm` runs it as a kernel of its own; :func:`qmamba.kernels.w4a8_rows.w4a8_rows`
runs it in the last program of each row to finish (``out_norm``, ``DecodePolicy.int8_rows_fc2_norm``), so the add +
norm after a batched step's MoE layer needs no launch. Both compute the same operations in the same order:
``r = h + residual`` in float32, its mean (LayerNorm) and ``rstd = rsqrt(mean of squares + eps)``, then
``x = r * rstd * w`` (RMSNorm) or ``(r - mean) * rstd * w + b`` (LayerNorm), stored in ``x``'s type.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qmamba.kernels._triton import jit, tl


@jit
def normed(r, dm, mean, rstd, nw, nb, LAYERNORM: tl.constexpr, out_ty: tl.constexpr):
    """The norm of the fp32 values ``r`` given the row's ``mean`` / ``rstd``, as the stored type ``out_ty``."""
    if LAYERNORM:
        y = tl.where(dm, r - mean, 0.0) * rstd * nw + nb
    else:
        y = r * rstd * nw
    return y.to(out_ty)


@jit
def row_stats(r, dm, D, eps, LAYERNORM: tl.constexpr):
    """``(mean, rstd)`` of the fp32 row ``r`` (``D`` values where ``dm``, zeros past them); the mean is 0 for
    RMSNorm."""
    mean = 0.0
    if LAYERNORM:
        mean = tl.sum(r, axis=0) / D
        c = tl.where(dm, r - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(c * c, axis=0) / D + eps)
    else:
        rstd = tl.rsqrt(tl.sum(r * r, axis=0) / D + eps)
    return mean, rstd


@jit
def add_norm_row(h_row, shk, res_row, w_ptr, nb_ptr, x_row, D, eps, BLOCK_D: tl.constexpr,
                 LAYERNORM: tl.constexpr, FROM_L2: tl.constexpr):
    """``res_row <- h_row + res_row`` (fp32, in place) and ``x_row <- norm(res_row)`` for one row of ``D`` values
    (``h`` at stride ``shk``). ``FROM_L2``: ``h`` is read past the SM's L1 (``.cg``): values other programs of the
    same kernel wrote."""
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    if FROM_L2:
        r = tl.load(h_row + d * shk, mask=dm, other=0.0, cache_modifier=".cg").to(tl.float32)
    else:
        r = tl.load(h_row + d * shk, mask=dm, other=0.0).to(tl.float32)
    r += tl.load(res_row + d, mask=dm, other=0.0)
    nw = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    nb = nw
    if LAYERNORM:
        nb = tl.load(nb_ptr + d, mask=dm, other=0.0).to(tl.float32)
    mean, rstd = row_stats(r, dm, D, eps, LAYERNORM)
    tl.store(res_row + d, r, mask=dm)
    tl.store(x_row + d, normed(r, dm, mean, rstd, nw, nb, LAYERNORM, x_row.dtype.element_ty), mask=dm)


class RowAddNorm(NamedTuple):
    """What a kernel's last program of a row needs to end with the add + norm of that row: ``residual [M, D]``
    float32 (rows contiguous; added to in place), ``norm_w [D]`` (and ``norm_b [D]`` for a LayerNorm), ``x_out
    [M, D]`` (the normed row, in its own type), ``eps``, and ``counter`` int32 ``[M]`` (zeros before the first call,
    left at zeros after each)."""

    residual: torch.Tensor
    norm_w: torch.Tensor
    norm_b: torch.Tensor | None
    x_out: torch.Tensor
    eps: float
    counter: torch.Tensor


def check_row_add_norm(who: str, spec, rows: int, d: int):
    """Refuse a :class:`RowAddNorm` whose tensors do not fit ``rows`` rows of ``d`` values."""
    if not isinstance(spec, RowAddNorm):
        raise ValueError(f"{who}: out_norm must be a RowAddNorm")
    res, w, b, x, _, counter = spec
    if not (res.dtype == torch.float32 and tuple(res.shape) == (rows, d) and res.stride(1) == 1):
        raise ValueError(f"{who}: out_norm's residual must be float32 [{rows}, {d}] with contiguous rows")
    if not (tuple(x.shape) == (rows, d) and x.stride(1) == 1):
        raise ValueError(f"{who}: out_norm's x_out must be [{rows}, {d}] with contiguous rows")
    if tuple(w.shape) != (d,) or (b is not None and tuple(b.shape) != (d,)) or not w.is_contiguous() or (
            b is not None and not b.is_contiguous()):
        raise ValueError(f"{who}: out_norm's norm weights must be contiguous [{d}]")
    if not (isinstance(counter, torch.Tensor) and tuple(counter.shape) == (rows,) and counter.dtype == torch.int32
            and counter.is_contiguous()):
        raise ValueError(f"{who}: out_norm's counter must be contiguous [{rows}] int32 (zeros)")
