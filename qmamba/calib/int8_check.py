"""Whether int8 activations are harmless for a quantized model: the check behind the W4A8 prefill's default.

On CUDA the prefill can run the MoE's int4 expert matmuls on int8 tensor cores (W4A8,
:mod:`qmamba.kernels.w4a8_gemm`), with each row of their input rounded to int8 on a per-row scale. That is faster
(a 2,048-token prefill of BlackMamba-2.8B 179k -> 200k tokens/s on an H100, session 41) but it changes the numbers,
and by how much depends on the model's activations: a row with one large outlier loses the precision of all its
other entries. So ``qmamba quantize`` measures it on its own calibration text: :func:`int8_activation_check` runs
the quantized model on the reference path twice, as is and with those inputs rounded to int8 as the kernel rounds
them (``QuantExperts.int8_inputs``), and compares the next-token distributions. When the mean KL divergence stays
within :data:`KL_LIMIT` the checkpoint's manifest turns the W4A8 prefill on (``quantization_info.int8_activations``,
read by :func:`qmamba.load_model`); ``--int8-activations`` / ``--no-int8-activations`` override it.

The walk goes one block at a time on ``device`` in float32 (as the router report's), so a model that does not fit
on the device is checked too; both variants run through each block while it is there.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qmamba.calib.checkpointed_stream import block_output
from qmamba.calib.chunked_kl import kl_sum
from qmamba.calib.pipeline import module_device, move_module
from qmamba.kernels.matmul_configs import W4A8_PREFILL_MIN_M
from qmamba.quant.modules import QuantExperts

# mean KL(as is || int8 inputs) in nats per token up to which the W4A8 prefill is on by default: a tenth of what a
# change of about 1% perplexity costs, and well above what it measured on the trained fixtures (see results.md)
KL_LIMIT = 1e-3


def w4a8_experts(model: nn.Module) -> list[QuantExperts]:
    """The model's expert stacks that the W4A8 prefill would run (int4 plane-word matrices)."""
    return [m for m in model.modules() if isinstance(m, QuantExperts) and m.w4a8_applies()]


def _set_int8_inputs(module: nn.Module, on: bool) -> None:
    for m in module.modules():
        if isinstance(m, QuantExperts):
            m.int8_inputs = on


@torch.no_grad()
def int8_activation_check(model: nn.Module, ids: torch.Tensor, device=None, batch_size: int = 8,
                          progress: bool = False, kl_limit: float = KL_LIMIT) -> dict | None:
    """The quantized ``model`` on ``ids [N, L]`` as is and with its W4A8-able expert inputs rounded to int8:
    ``{"kl": mean KL(as is || int8) in nats per token, "top1_agreement": share of positions whose argmax is
    unchanged, "tokens", "kl_limit", "prefill_default": kl <= kl_limit}``; None when no expert stack would run on
    W4A8 (nothing to decide). The model is left as it was (place, dtypes, ``int8_inputs`` off)."""
    if not w4a8_experts(model):
        return None
    dev = torch.device(device) if device is not None else ids.device
    home = model.embedding.weight.device
    # whole chunks of at least the kernels' W4A8 rows, so the rounding applies as it would in a prefill
    batch_size = max(batch_size, -(-W4A8_PREFILL_MIN_M // max(ids.shape[1], 1)))
    chunks = list(ids.split(batch_size))
    embedded = [model.embedding(c.to(home)).float().to(dev) for c in chunks]
    streams = {on: ([torch.zeros_like(e) for e in embedded], list(embedded)) for on in (False, True)}
    try:
        for block in tqdm(model.blocks, desc="int8 activation check", unit="block", disable=not progress,
                          dynamic_ncols=True):
            block_home = module_device(block.module)
            dtypes = move_module(block.module, dev, torch.float32)
            for on, (residual, h) in streams.items():
                _set_int8_inputs(block.module, on)
                residual[:] = [r + hh for r, hh in zip(residual, h)]
                h[:] = [block_output(block, r, torch.float32) for r in residual]
            _set_int8_inputs(block.module, False)
            move_module(block.module, block_home, dtypes=dtypes)
        kl, same, tokens = _compare_heads(model, streams, dev)
    finally:
        _set_int8_inputs(model, False)
    mean_kl = kl / max(tokens, 1)
    return {"kl": mean_kl, "top1_agreement": same / max(tokens, 1), "tokens": tokens, "kl_limit": kl_limit,
            "prefill_default": bool(mean_kl <= kl_limit)}


def _compare_heads(model: nn.Module, streams: dict, dev) -> tuple[float, int, int]:
    """Sum of per-token KL(as is || int8), positions with the same argmax, positions: the final norm and the head
    on ``dev`` in float32, one sequence at a time (``[L, V]`` logits, never the batch's)."""
    parts = (model.norm_f, model.lm_head)
    homes = [(module_device(m), move_module(m, dev, torch.float32)) for m in parts]
    kl, same, tokens = 0.0, 0, 0
    try:
        (res_a, h_a), (res_b, h_b) = streams[False], streams[True]
        for ra, ha, rb, hb in zip(res_a, h_a, res_b, h_b):
            for i in range(ra.shape[0]):
                logits = [model.lm_head(model.norm_f.add_forward(r[i], h[i], torch.float32)[1]).float()
                          for r, h in ((ra, ha), (rb, hb))]
                kl += float(kl_sum(logits[1], logits[0]))  # KL(teacher = as is || student = int8)
                same += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
                tokens += logits[0].shape[0]
    finally:
        for m, (home, dtypes) in zip(parts, homes):
            move_module(m, home, dtypes=dtypes)
    return kl, same, tokens
