"""``qmamba quantize --route-aware``: which quantized matrices move an MoE model's routing, and which to keep at int8.

A sensitivity pass rounds one planned int4 matrix at a time to nearest (the rest of the model in float) and records
the top-1 routing agreement of every MoE layer with the float model on a few calibration tokens
(:func:`routing_sensitivity`; one block-at-a-time walk per matrix, matrices after the last router skipped). The
matrices with the largest drop per parameter go to int8 while their parameters fit in a budget (a fraction of the
quantized parameters, :func:`pick_route_sensitive`). Measurements and the choice of default: ``docs/routing.md``.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qmamba.calib.pipeline import record_routing_blockwise


def _fake_quantize(W: torch.Tensor, fmt) -> torch.Tensor:
    """RTN round trip of ``W [N, K]`` or an expert stack ``[E, N, K]`` in ``fmt``, in float32."""
    if W.dim() == 3:
        return torch.stack([_fake_quantize(w, fmt) for w in W])
    W = W.float()
    s, z = fmt.params(W)
    return fmt.dequantize_codes(fmt.quantize(W, s, z), s, z)


def module_weight(model: nn.Module, name: str) -> torch.nn.Parameter:
    """The weight parameter of planned module ``name`` (a linear's ``[N, K]`` or an expert stack ``[E, N, K]``)."""
    parent, _, leaf = name.rpartition(".")
    if leaf in ("fc1", "fc2"):
        return getattr(model.get_submodule(parent), leaf)
    return model.get_submodule(name).weight


@torch.no_grad()
def routing_sensitivity(model: nn.Module, ids: torch.Tensor, plan: dict, device=None, batch_size: int = 8,
                        progress: bool = False) -> dict[str, float]:
    """``{module: top-1 routing agreement with the float model}`` when only that planned module is rounded to
    nearest in its planned format (``ids [N, L]``; the model is restored after each). Modules after the last MoE
    layer cannot move any router and are skipped."""
    last_moe = max(model.config.moe_layer_ids, default=-1)
    reference = record_routing_blockwise(model, ids, device, batch_size)
    out = {}
    for name, entry in tqdm(plan.items(), desc="route-aware: sensitivity", unit="module", disable=not progress):
        if name == "lm_head" or int(name.split(".")[1]) >= last_moe:
            continue
        p = module_weight(model, name)
        saved = p.data.clone()
        p.data.copy_(_fake_quantize(saved, entry.fmt).to(p.dtype))
        routes = record_routing_blockwise(model, ids, device, batch_size)
        p.data.copy_(saved)
        same = sum(int((routes[i] == reference[i]).sum()) for i in reference)
        out[name] = same / sum(v.numel() for v in reference.values())
    return out


def pick_route_sensitive(agreement: dict[str, float], n_params: dict[str, int], budget_params: float) -> list[str]:
    """The modules to keep at higher precision: by descending routing drop (``1 - agreement``) per parameter,
    while their parameters fit in ``budget_params``; modules that do not move the routing are never picked."""
    order = sorted((m for m in agreement if agreement[m] < 1.0),
                   key=lambda m: (1.0 - agreement[m]) / max(1, n_params[m]), reverse=True)
    picked, used = [], 0
    for m in order:
        if used + n_params[m] <= budget_params:
            picked.append(m)
            used += n_params[m]
    return picked
