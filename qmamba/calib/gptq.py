"""GPTQ (Frantar et al. 2022) for one weight matrix, on any registered format's grouped quantizer.

Given ``W [N, K]`` and the input Hessian ``H = 2 X^T X / T [K, K]`` (accumulated by :class:`HessianAccumulator`),
columns are quantized one at a time and the error of each is spread over the not-yet-quantized columns through the
inverse Hessian's upper Cholesky factor. Choices, as in the reference implementation:

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


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
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
    raise GPTQFailure("Hessian not positive definite after damping")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False):
    """Quantize ``W [N, K]`` given ``H [K, K]``; returns integer codes and group params ``(q, scale, zero)``.

    ``fmt.from_codes(q, scale, zero)`` gives the packed tensors; ``fmt.dequantize_codes`` the dense result.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n, k = W.shape
    g = fmt.group_size_for(k)
    n_groups = fmt.n_groups(k)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = None
    static_scale = static_zero = None
    if act_order:
        static_scale, static_zero = fmt.params(W)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)

    scale = torch.zeros(n, n_groups, device=W.device)
    zero = None if static_zero is None and fmt.bits == 8 else torch.zeros(n, n_groups, device=W.device)
    if static_scale is not None:
        scale, zero = static_scale, static_zero
    q_codes = torch.zeros(n, k, dtype=torch.int16, device=W.device)
    done_groups: set[int] = set()

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i]) if perm is not None else i1 + i
            grp = col // g
            if static_scale is None and grp not in done_groups:
                # natural order: col is the group's first column; its columns are W1[:, i:] then W[:, i2:]
                width = min(g, k - col)
                cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :width]
                s, z = fmt.params(cols)
                scale[:, grp] = s[:, 0]
                if z is not None:
                    zero[:, grp] = z[:, 0]
                done_groups.add(grp)
            w = W1[:, i]
            s_col = scale[:, grp: grp + 1]
            z_col = None if zero is None else zero[:, grp: grp + 1]
            q = fmt.quantize(w[:, None], s_col, z_col)
            wq = fmt.dequantize_codes(q, s_col, z_col)[:, 0]
            q_codes[:, col] = q[:, 0].to(torch.int16)
            err = (w - wq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    dtype = torch.int8 if fmt.bits == 8 else torch.uint8
    return q_codes.to(dtype), scale, zero
