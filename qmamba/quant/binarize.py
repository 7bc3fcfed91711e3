"""Post-training binarization (PTB): the data-free initialisation of the 1-bit ``binary`` format (the 1-bit
counterpart of int4 RTN, so it lives beside the format, not in the calibration package).

Bi-Mamba's form ``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` keeps one scale and one offset per *input* column
``k`` of ``W [N, K]`` (``nn.Linear`` orientation). From column statistics alone:

    beta[k]  = mean_n W[n, k]                      (column mean)
    s[n, k]  = sign(W[n, k] - beta[k])             (sign(0) := +1, see qmamba.quant.layout)
    alpha[k] = mean_n |W[n, k] - beta[k]|          (mean absolute deviation from the mean)

For these signs, this ``alpha`` is the least-squares optimum, and ``beta`` the least-squares optimum for
``alpha = 0``; we keep Bi-Mamba's initialisation as is (distillation then trains alpha and beta).

Per-output-row variant (``row_scale=True``): ``W_hat[n, k] = r[n] * (alpha[k] s[n, k] + beta[k])``. Rows of very
different magnitude (common in trained projections) share the column statistics badly; ``r`` is fitted by a few
rounds of alternating least squares: normalise rows by ``r``, take the column statistics of ``W / r``, then refit
each ``r[n]`` by least squares against ``W[n, :]``.

Parameters are rounded to fp16 (their stored precision) before the signs are taken, so the packed tensors
dequantize to exactly the ``W_hat`` computed here. Stacked experts ``[E, N, K]`` are handled per expert.
"""

from __future__ import annotations

import torch

_FP16_MAX = 60000.0
_FP16_TINY = 2.0 ** -24


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()


def column_statistics(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [..., N, K]`` -> ``(alpha, beta)`` each ``[..., K]`` float32, fp16-representable, alpha > 0."""
    Wf = W.float()
    beta = _fp16(Wf.mean(dim=-2))
    alpha = (Wf - beta[..., None, :]).abs().mean(dim=-2)
    alpha = alpha.clamp(min=_FP16_TINY).to(torch.float16).float()
    return alpha, beta


def signs_for(W: torch.Tensor, beta: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Sign bits (uint8 0/1) of ``W / r - beta`` (``r`` = row scale, or 1): 1 where >= 0."""
    Wf = W.float()
    if row_scale is not None:
        Wf = Wf / row_scale[..., :, None]
    return (Wf - beta[..., None, :] >= 0).to(torch.uint8)


def reconstruct(bits: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``W_hat [..., N, K]`` (float32) from sign bits and parameters."""
    W = (bits.float() * 2 - 1) * alpha[..., None, :] + beta[..., None, :]
    return W if row_scale is None else W * row_scale[..., :, None]


def ptb(W: torch.Tensor, row_scale: bool = False, rounds: int = 3):
    """Binarize ``W [..., N, K]``: ``(bits [..., N, K] uint8, alpha [..., K], beta [..., K], r [..., N] or None)``.

    All parameters float32 and exactly fp16-representable.
    """
    Wf = W.float()
    if not row_scale:
        alpha, beta = column_statistics(Wf)
        return signs_for(Wf, beta), alpha, beta, None
    r = _fp16(Wf.abs().mean(dim=-1).clamp(min=1e-8))
    r = r / r.mean(dim=-1, keepdim=True).clamp(min=1e-12)
    for _ in range(max(1, rounds)):
        r = _fp16(r).clamp(min=_FP16_TINY)
        alpha, beta = column_statistics(Wf / r[..., :, None])
        bits = signs_for(Wf, beta, r)
        base = reconstruct(bits, alpha, beta)
        num = (Wf * base).sum(-1)
        den = (base * base).sum(-1).clamp(min=1e-20)
        r = (num / den).clamp(min=1e-8)
    r = _fp16(r).clamp(min=_FP16_TINY)
    alpha, beta = column_statistics(Wf / r[..., :, None])
    return signs_for(Wf, beta, r), alpha, beta, r

