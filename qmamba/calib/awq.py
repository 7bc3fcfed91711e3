"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, then a clipping search.

Scale search: for ``alpha`` on a grid of ``n_grid`` values in [0, 1), ``s = mean|x|^alpha`` (normalised so that
``sqrt(max(s) * min(s)) = 1``); the weights become ``W * s`` (columns), the activations ``x / s``, and the alpha
whose quantize-dequantize output error ``|| x W^T - (x/s) Q(W s)^T ||^2`` on the calibration tokens is smallest
wins. ``alpha = 0`` is ``s = 1`` (plain RTN), so the chosen scale is never worse than RTN on the calibration
tokens. Several weights may share one input and one ``s`` (all experts of an MoE layer read the same normed hidden
state, so their fc1 scale can only be folded into that norm if it is shared): the error is then summed over them,
each on its own tokens.

Clipping search: per output row and group, the range is shrunk by ``1 - i / n_grid`` (i < max_shrink * n_grid)
and the ratio with the smallest group output error on the tokens is kept.

Folding ``1/s`` into the producer of ``x`` is the caller's job (``qmamba.calib.pipeline``): it must be exact.
"""

from __future__ import annotations

import torch

from qmamba.quant.formats import WeightFormat


def _normalised_scale(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.clamp(min=1e-4).pow(alpha)
    s = s / torch.sqrt(s.max() * s.min())
    return s.clamp(min=1e-4)


def search_scale(pairs: list[tuple[torch.Tensor, torch.Tensor]], x_mean: torch.Tensor, fmt: WeightFormat,
                 n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best shared input scale for ``pairs = [(W [N, K], x [T, K]), ...]``.

    Returns ``(s [K], alpha, relative error at alpha)``; apply as ``W * s`` and ``x / s``.
    """
    refs = [x.float() @ W.float().T for W, x in pairs]
    denom = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    best = (None, 0.0, float("inf"))
    for i in range(n_grid):
        alpha = i / n_grid
        s = _normalised_scale(x_mean.float(), alpha)
        err = 0.0
        for (W, x), ref in zip(pairs, refs):
            Wq = fmt.fake_quantize(W.float() * s)
            err += float(((x.float() / s) @ Wq.T - ref).pow(2).sum())
        if err < best[2]:
            best = (s, alpha, err)
    s, alpha, err = best
    return s, alpha, err / denom


def search_clip(W: torch.Tensor, x: torch.Tensor, fmt: WeightFormat, n_grid: int = 20, max_shrink: float = 0.5,
                token_chunk: int = 1024) -> torch.Tensor:
    """Best clip ratio per (row, group) of ``W [N, K]`` on inputs ``x [T, K]``: returns ``[N, n_groups]``."""
    W = W.float()
    n, k = W.shape
    g = fmt.group_size_for(k)
    n_groups = fmt.n_groups(k)
    pad = n_groups * g - k
    xg = torch.nn.functional.pad(x.float(), (0, pad)).reshape(-1, n_groups, g)        # [T, G, g]
    best_err = torch.full((n, n_groups), float("inf"), device=W.device)
    best_ratio = torch.ones(n, n_groups, device=W.device)
    for i in range(int(max_shrink * n_grid)):
        ratio = 1.0 - i / n_grid
        dW = W - fmt.fake_quantize(W, ratio)
        dWg = torch.nn.functional.pad(dW, (0, pad)).reshape(n, n_groups, g)            # [N, G, g]
        err = torch.zeros(n, n_groups, device=W.device)
        for t0 in range(0, xg.shape[0], token_chunk):
            out = torch.einsum("tgc,ngc->tng", xg[t0: t0 + token_chunk], dWg)         # [T, N, G]
            err += out.pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def quantize_with_clip(W: torch.Tensor, clip: torch.Tensor, fmt: WeightFormat):
    """Codes and group params of ``W`` with per-(row, group) clip ratios: ``(q, scale, zero)``."""
    scale, zero = fmt.params(W, clip)
    return fmt.quantize(W, scale, zero), scale, zero
