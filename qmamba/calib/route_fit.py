"""Router refit (``qmamba quantize --refit-routers``): keep an MoE model's top-1 routing under weight quantization.

A router reads the residual stream, which carries the quantization error of every earlier layer; a token whose
top-1 and top-2 router logits are close flips to another expert. The routers stay in float (a few KiB), so they
can absorb that drift at no cost in size: during the calibration walk, when the walk reaches an MoE block (every
earlier block already quantized, earlier routers already refitted), the router ``z = W x + b`` is refitted by
ridge regression from the block's *quantized-model* inputs ``x_q`` to the *float model's* router logits ``z_f`` on
the same calibration tokens::

    [W' b'] = argmin sum_t ||W' x_q,t + b' - z_f,t||^2 + lam ||[W' b'] - [W b]||^2,   lam = ridge * tr(X^T X) / (d+1)

(closed form; the ridge pulls toward the float router, so a layer whose inputs did not drift keeps its router).
The experts of the block are then calibrated on the refitted routing, as inference will route. Targets come from
one float walk over the calibration ids before quantization (:func:`qmamba.calib.pipeline.float_router_logits`: ``[tokens, E]`` per MoE
layer, a few MiB).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_RIDGE = 1e-3


@torch.no_grad()
def refit_router(router: nn.Linear, x: torch.Tensor, target: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> dict:
    """Refit ``router`` (``nn.Linear(d, E)``, bias optional) in place so that ``router(x)`` approaches ``target``
    (``x [T, d]``: the router's inputs in the quantized model; ``target [T, E]``: the float model's logits on the
    same tokens), ridge-regularised toward its current weights. Returns the top-1 agreement with the target's
    argmax on ``x`` before and after (in-sample)."""
    if x.shape[0] != target.shape[0]:
        raise ValueError(f"router refit: {x.shape[0]} inputs but {target.shape[0]} target rows")
    dev = router.weight.device
    x64 = x.to(dev, torch.float64)
    z = target.to(dev, torch.float64)
    has_bias = router.bias is not None
    xa = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=x64.dtype, device=dev)], 1) if has_bias else x64
    w0 = router.weight.detach().to(torch.float64)
    if has_bias:
        w0 = torch.cat([w0, router.bias.detach().to(torch.float64)[:, None]], 1)  # [E, d+1]
    gram = xa.T @ xa
    lam = ridge * torch.trace(gram) / gram.shape[0]
    rhs = xa.T @ z + lam * w0.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=dev)
    theta = torch.linalg.solve(gram + lam * eye, rhs).T  # [E, d(+1)]
    want = z.argmax(-1)
    before = float((router(x.to(dev, router.weight.dtype)).argmax(-1) == want).float().mean())
    if not torch.isfinite(theta).all():
        return {"before": before, "after": before, "refit": False}
    router.weight.data.copy_(theta[:, : x.shape[1]].to(router.weight.dtype))
    if has_bias:
        router.bias.data.copy_(theta[:, -1].to(router.bias.dtype))
    after = float((router(x.to(dev, router.weight.dtype)).argmax(-1) == want).float().mean())
    return {"before": before, "after": after, "refit": True}
