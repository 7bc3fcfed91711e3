"""Shared builders for the export tests: tiny models with weights large enough that every path matters, their
round-to-nearest quantized twins (through qmamba.quant, independent of the exporter), and comparison helpers."""

from __future__ import annotations

import torch
from torch import nn

from qmamba.checkpoints.load import build_model
from qmamba.checkpoints.random_init import random_state_dict
from qmamba.config import preset
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.quant.modules import QuantExperts, QuantLinear


def tiny_state_dict(name: str, seed: int = 7) -> tuple:
    """``(config, state_dict)`` of a tiny preset with scaled-up weights (routing, conv and state all matter)."""
    cfg = preset(name)
    sd = random_state_dict(cfg, seed=seed)
    g = torch.Generator().manual_seed(0)
    for key, t in sd.items():
        if key.endswith(("conv_weight", "x_proj.weight", "dt_proj.weight", "in_proj.weight", "fc1", "fc2",
                         "router.weight")):
            t.mul_(3.0).add_(0.05 * torch.randn(t.shape, generator=g))
    return cfg, sd


def torch_model(cfg, state_dict, manifest=None, dtype=torch.float32):
    return build_model(cfg, dict(state_dict), manifest or {}, "cpu", dtype)


def make_format(kind: str, group_size: int = 32):
    return Int8Format() if kind == "int8" else Int4Format(group_size=group_size)


def rtn_quantized(cfg, state_dict, kind: str, group_size: int = 32, head: bool = True, xdt: bool = True):
    """Quantize (round to nearest) a float checkpoint: returns ``(state_dict, manifest)`` of the quantized one."""
    model = torch_model(cfg, state_dict)
    fmt = make_format(kind, group_size)
    entries = {}
    for block in model.blocks:
        mixer, i = block.mixer, block.index
        if block.is_mamba:
            names = ["in_proj", "out_proj"] + (["x_proj", "dt_proj"] if xdt else [])
            for leaf in names:
                setattr(mixer, leaf, QuantLinear.from_linear(getattr(mixer, leaf), fmt))
                entries[f"layers.{i}.mixer.{leaf}"] = fmt.to_dict()
        else:
            mixer.experts = QuantExperts.from_stacked(mixer.experts, fmt, fmt)
            entries[f"layers.{i}.mixer.experts.fc1"] = fmt.to_dict()
            entries[f"layers.{i}.mixer.experts.fc2"] = fmt.to_dict()
    if head:
        model.lm_head = QuantLinear.from_linear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), fmt,
                                                fmt.quantize_rtn(model.embedding.weight.detach()))
        entries["lm_head"] = fmt.to_dict()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return sd, {"quantization": entries}


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).abs().max() / b.abs().max()).item()


def dequantized_twin(model):
    """Replace every quantized module of ``model`` by its float twin holding the dequantized weights: the same
    math as the reference backend of QuantLinear/QuantExperts, without dequantizing on every call (fast)."""
    from qmamba.moe import StackedExperts
    from qmamba.quant.modules import PackedExpertWeight

    for name, mod in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, QuantLinear):
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            new.weight.data.copy_(mod.dequantized_weight())
            if mod.bias is not None:
                new.bias.data.copy_(mod.bias.detach())
            setattr(parent, leaf, new)
        elif isinstance(mod, QuantExperts):
            fc1 = mod.fc1.dequantized() if isinstance(mod.fc1, PackedExpertWeight) else mod.fc1.detach()
            fc2 = mod.fc2.dequantized() if isinstance(mod.fc2, PackedExpertWeight) else mod.fc2.detach()
            new = StackedExperts(mod.n_experts, fc1.shape[2], fc2.shape[2], mod.gated, mod.activation)
            new.fc1.data.copy_(fc1)
            new.fc2.data.copy_(fc2)
            setattr(parent, leaf, new)
    return model.requires_grad_(False)
