"""GPTQ (Frantar et al. 2022) for a weight matrix or a stack of them (MoE experts), on any registered format's
grouped quantizer.

Given ``W [N, K]`` and the input Hessian ``H = 2 X^T X / T [K, K]`` (accumulated by :class:`HessianAccumulator`),
columns are quantized one at a time and the error of each is spread over the not-yet-quantized columns through the
inverse Hessian's upper Cholesky factor. :func:`gptq_quantize_batched` runs that column loop once for a stack
``W [E, N, K]`` with Hessians ``H [E, K, K]`` (each step broadcast over the stack: on a GPU the loop is bound by
kernel launches, not by the size of each step); :func:`gptq_quantize` is its stack of one. Choices, as in the
reference implementation:

* damping ``0.01 * mean(diag H)`` added to the diagonal (raised x10 up to 4 times if Cholesky fails, then the
  caller falls back to RTN); dead inputs (``H[k, k] == 0``) get weight 0 and ``H[k, k] = 1``;
* lazy block updates of 128 columns;
* groups: a group's scale/zero are computed when its first column is reached, from the current (already updated)
  weights of that group; with ``act_order`` columns go by descending ``diag H`` and the group parameters are
  *static* (computed from the original weights up front), so the packed group -> scale map stays contiguous.
"""

from __future__ import annotations

import torch

from qmamba.quant.formats import WeightFormat


class HessianAccumulator:
    """Running ``H = 2/T * sum_t x_t x_t^T`` over batches of inputs ``x [..., K]``, accumulated in ``dtype``
    (float64 by default; float32 on GPUs, whose float64 rate is a small fraction of their float32 rate)."""

    def __init__(self, k: int, device=None, dtype: torch.dtype = torch.float64):
        self.H = torch.zeros(k, k, dtype=dtype, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        self.H.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 * self.H / max(self.n_tokens, 1)).float()


class GPTQFailure(RuntimeError):
    """The damped Hessian stayed non positive-definite: the caller uses RTN instead."""


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of the damped ``H [K, K]``'s inverse, or ``None`` if every damping attempt fails."""
    diag_mean = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(5):
        Hd = H + (damp * 10 ** attempt) * diag_mean * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U
    return None


def _permute_columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t [E, R, K]`` with the columns of slice ``e`` in the order ``perm[e]``."""
    return t.gather(2, perm[:, None, :].expand_as(t))


def _quantize_columns(W: torch.Tensor, U: torch.Tensor, fmt: WeightFormat, block_size: int,
                      perm: torch.Tensor | None, static: tuple | None):
    """The GPTQ column loop over a stack ``W [E, N, K]`` (modified) with inverse-Hessian factors ``U [E, K, K]``.

    ``perm`` (act order): ``W``'s columns are already in that order, ``static = (scale, zero)`` are the group
    parameters of the original columns. Without it groups are natural: a group's parameters are computed when its
    first column is reached. Returns codes ``[E, N, K]`` in the original column order, scale and zero ``[E, N, G]``.
    """
    n_mat, n, k = W.shape
    g = fmt.group_size_for(k)
    scale, zero = static if static is not None else (W.new_zeros(n_mat, n, fmt.n_groups(k)), None)
    q_codes = None

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is not None:  # each matrix's column col is its original column perm[:, col]: gather its group
                at = (perm[:, col] // g)[:, None, None].expand(n_mat, n, 1)
                s_col = scale.gather(2, at)
                z_col = None if zero is None else zero.gather(2, at)
            else:
                grp = col // g
                if col % g == 0:  # the group's columns: W1[..., i:] then the (lazily updated) W[..., i2:]
                    width = min(g, k - col)
                    cols = W1[:, :, i:i + width]
                    if cols.shape[2] < width:
                        cols = torch.cat([cols, W[:, :, i2:i2 + width - cols.shape[2]]], dim=2)
                    s, z = fmt.params(cols)
                    scale[:, :, grp] = s[:, :, 0]
                    if z is not None:
                        if zero is None:
                            zero = torch.zeros_like(scale)
                        zero[:, :, grp] = z[:, :, 0]
                s_col = scale[:, :, grp:grp + 1]
                z_col = None if zero is None else zero[:, :, grp:grp + 1]
            w = W1[:, :, i]
            q = fmt.quantize(w[:, :, None], s_col, z_col)
            wq = fmt.dequantize_codes(q, s_col, z_col)[:, :, 0]
            if q_codes is None:
                q_codes = torch.empty(n_mat, n, k, dtype=q.dtype, device=W.device)
            q_codes[:, :, col] = q[:, :, 0]
            err = (w - wq) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(Err1, U[:, i1:i2, i2:])

    if perm is not None:
        q_codes = torch.empty_like(q_codes).scatter_(2, perm[:, None, :].expand_as(q_codes), q_codes)
    return q_codes, scale, zero


def gptq_quantize_batched(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128,
                          damp: float = 0.01, act_order: bool = False) -> list[tuple | None]:
    """GPTQ of a stack ``W [E, N, K]`` with one Hessian per matrix ``H [E, K, K]``, in one column loop.

    Each per-column step acts on all ``E`` matrices at once (the lazy block update is a ``bmm``), so a stack of
    experts costs one loop's worth of small operations instead of ``E``. Every matrix is treated as by itself:
    its own dead inputs, its own damping retries, natural-order groups (or, with ``act_order``, its own column
    permutation with static groups). Returns one ``(q, scale, zero)`` per matrix, ``None`` for a matrix whose
    damped Hessian stayed non positive-definite (the others are unaffected).
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n_mat, n, k = W.shape
    diag = H.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)

    perm = static = None
    if act_order:
        static = fmt.params(W)
        perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
        W = _permute_columns(W, perm)
        H = _permute_columns(_permute_columns(H, perm).transpose(1, 2), perm).transpose(1, 2)  # rows and columns
    factors = [_inverse_cholesky(H[e], damp) for e in range(n_mat)]
    del H
    ok = [e for e, U in enumerate(factors) if U is not None]
    if not ok:
        return [None] * n_mat
    if len(ok) < n_mat:
        W = W[ok]
        perm = None if perm is None else perm[ok]
        static = None if static is None else tuple(None if t is None else t[ok] for t in static)
    q, scale, zero = _quantize_columns(W, torch.stack([factors[e] for e in ok]), fmt, block_size, perm, static)
    results: list[tuple | None] = [None] * n_mat
    for j, e in enumerate(ok):
        results[e] = (q[j], scale[j], None if zero is None else zero[j])
    return results


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False):
    """Quantize ``W [N, K]`` given ``H [K, K]``; returns integer codes and group params ``(q, scale, zero)``.

    ``fmt.from_codes(q, scale, zero)`` gives the packed tensors; ``fmt.dequantize_codes`` the dense result.
    Raises :class:`GPTQFailure` when the damped Hessian is not positive definite. (The stack of one matrix of
    :func:`gptq_quantize_batched`.)
    """
    solved = gptq_quantize_batched(W[None], H[None], fmt, block_size, damp, act_order)[0]
    if solved is None:
        raise GPTQFailure("Hessian not positive definite after damping")
    return solved
