"""Zyphra BlackMamba checkpoints: ``pytorch_model.bin`` holding ``{"model": OrderedDict}`` (bf16) + a
Megatron-style ``config.json``.

The reference loader reads exactly ``num_layers, hidden_size, state_size, conv_dimension, vocab_size,
expansion_factor, mamba_moe_layers, ffn_hidden_size, add_bias_linear, swiglu, max_sequence_length`` and ignores
other keys (norm eps 1e-5, dt_rank = ceil(hidden / 16), conv bias on). ``mamba_moe_layers`` is a list of codes or
a string (codes separated by spaces/commas, or one character per layer, as the reference indexes it).
Experts ``local_experts.{e}.linear_fc{1,2}.weight`` are stacked into ``experts.fc{1,2} [E, ...]``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path

import torch

from qmamba.config import MAX_LAYERS, ModelConfig
from qmamba.errors import CheckpointError, ConfigError

from .files import (check_tensor_dict, config_bool, config_int, hash_files, one_line, read_json, require_keys,
                    torch_load_safe, write_json)
from .keymap import KeyMap, mixer_rules, rename_to_internal, rename_to_source
from .manifest import source_manifest
from .record import Checkpoint

FORMAT = "blackmamba"
WEIGHTS = "pytorch_model.bin"
CONFIG = "config.json"
REQUIRED_CONFIG_KEYS = ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size",
                        "expansion_factor", "mamba_moe_layers", "ffn_hidden_size", "add_bias_linear", "swiglu")
DEFAULT_MAX_SEQUENCE_LENGTH = 2048

KEYS = KeyMap([
    ("embedding.word_embeddings.weight", "embedding.weight"),
    ("decoder.final_layernorm.weight", "norm_f.weight"),
    ("decoder.final_layernorm.bias", "norm_f.bias"),
    ("decoder.layers.{i}.mixer.local_experts.*.linear_fc1.weight", "layers.{i}.mixer.experts.fc1"),
    ("decoder.layers.{i}.mixer.local_experts.*.linear_fc2.weight", "layers.{i}.mixer.experts.fc2"),
    *mixer_rules("decoder.layers.{i}"),
])
_EXPERT_KEY = re.compile(r"decoder\.layers\.(\d+)\.mixer\.local_experts\.(\d+)\.linear_fc([12])\.weight\Z")
_TIED_HEAD = "output_layer.weight"


def looks_like(directory: Path, config: dict | None) -> bool:
    return config is not None and ("mamba_moe_layers" in config or (
        "num_layers" in config and "hidden_size" in config and "state_size" in config))


def parse_layer_plan(value, path: Path) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        codes = re.split(r"[\s,]+", text) if re.search(r"[\s,]", text) else list(text)
    elif isinstance(value, list) and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in value):
        codes = [str(c).strip() for c in value]
    else:
        raise ConfigError(f"config file {path}: mamba_moe_layers must be a list of codes or a string, "
                          f"got {one_line(repr(value), 80)}")
    return [c for c in codes if c]


def config_from_json(data: dict, path: Path) -> ModelConfig:
    require_keys(data, REQUIRED_CONFIG_KEYS, path)
    if config_bool(data, "add_bias_linear", path, False):
        raise ConfigError(f"config file {path}: add_bias_linear=true (biases on projections and experts) is not "
                          "supported; the released BlackMamba models use false")
    n_layers = config_int(data, "num_layers", path, maximum=MAX_LAYERS)
    layers = parse_layer_plan(data["mamba_moe_layers"], path)
    if len(layers) != n_layers:
        raise ConfigError(f"config file {path}: mamba_moe_layers has {len(layers)} codes but num_layers is "
                          f"{data['num_layers']}")
    sizes = {key: config_int(data, key, path) for key in
             ("hidden_size", "vocab_size", "state_size", "conv_dimension", "expansion_factor")}
    ffn = 0 if data["ffn_hidden_size"] is None else config_int(data, "ffn_hidden_size", path, minimum=0)
    try:
        return ModelConfig(
            d_model=sizes["hidden_size"], layers=layers, vocab_size=sizes["vocab_size"],
            d_state=sizes["state_size"], d_conv=sizes["conv_dimension"], expand=sizes["expansion_factor"],
            dt_rank=None, ffn_hidden=ffn, expert_gated=config_bool(data, "swiglu", path, True),
            expert_activation="gelu",
            final_norm="layernorm", norm_eps=1e-5, tie_embeddings=True, conv_bias=True, proj_bias=False,
            family="blackmamba",
            extra={"max_sequence_length": data.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)})
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def config_to_json(cfg: ModelConfig) -> dict:
    problems = []
    if cfg.final_norm != "layernorm":
        problems.append("final_norm must be 'layernorm'")
    if not cfg.tie_embeddings:
        problems.append("the head must be tied")
    if not cfg.conv_bias or cfg.proj_bias:
        problems.append("conv bias on and projection biases off are required")
    if cfg.expert_activation != "gelu" or cfg.norm_eps != 1e-5 or cfg.dt_rank != math.ceil(cfg.d_model / 16):
        problems.append("expert_activation 'gelu', norm_eps 1e-5 and dt_rank ceil(d_model/16) are fixed")
    if problems:
        raise ConfigError("the blackmamba format cannot hold this config: " + "; ".join(problems)
                          + " (use --format qmamba)")
    return {
        "num_layers": cfg.n_layers, "hidden_size": cfg.d_model, "state_size": cfg.d_state,
        "conv_dimension": cfg.d_conv, "vocab_size": cfg.vocab_size, "expansion_factor": cfg.expand,
        "mamba_moe_layers": list(cfg.layers), "ffn_hidden_size": cfg.ffn_hidden or 4 * cfg.d_model,
        "add_bias_linear": False, "swiglu": cfg.expert_gated,
        "max_sequence_length": cfg.extra.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH),
    }


def _stack_experts(sd: dict[str, torch.Tensor], cfg: ModelConfig, file: Path) -> dict[str, torch.Tensor]:
    """Pop per-expert tensors from ``sd`` and return ``{internal name: stacked [E, ...]}``, checking indices."""
    groups: dict[tuple[int, str], dict[int, str]] = {}
    for key in list(sd):
        m = _EXPERT_KEY.match(key)
        if m:
            groups.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = key
    kinds = cfg.layer_kinds
    stacked = {}
    for (layer, which), by_expert in sorted(groups.items()):
        first = next(iter(by_expert.values()))
        if layer >= len(kinds) or kinds[layer][0] != "moe":
            raise CheckpointError(f"checkpoint {file}: unexpected key {first!r} (layer {layer} is not an MoE layer)")
        n_experts = kinds[layer][1]
        missing = [e for e in range(n_experts) if e not in by_expert]
        extra = [e for e in by_expert if e >= n_experts]
        if missing or extra:
            pattern = f"decoder.layers.{layer}.mixer.local_experts.{{e}}.linear_fc{which}.weight"
            what = (f"missing key {pattern.format(e=missing[0])!r}" if missing
                    else f"unexpected key {pattern.format(e=extra[0])!r} (layer {layer} has {n_experts} experts)")
            raise CheckpointError(f"checkpoint {file}: {what}")
        keys = [by_expert[e] for e in range(n_experts)]
        shapes = {tuple(sd[k].shape) for k in keys}
        if len(shapes) != 1:
            raise CheckpointError(f"checkpoint {file}: experts of layer {layer} have different fc{which} shapes "
                                  f"({sorted(shapes)}), e.g. key {keys[-1]!r}")
        stacked[f"layers.{layer}.mixer.experts.fc{which}"] = torch.stack([sd.pop(k) for k in keys])
    return stacked


def _unstack_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop stacked experts from ``sd`` (internal names) into per-expert source tensors with their own storage."""
    out = {}
    for name in [n for n in sd if re.search(r"\.mixer\.experts\.fc[12]\Z", n)]:
        layer, which = re.match(r"layers\.(\d+)\.mixer\.experts\.fc([12])\Z", name).groups()
        stacked = sd.pop(name)
        for e in range(stacked.shape[0]):
            out[f"decoder.layers.{layer}.mixer.local_experts.{e}.linear_fc{which}.weight"] = stacked[e].clone()
        del stacked
    return out


def read(directory: Path, hash_weights: bool = True, config: dict | None = None) -> Checkpoint:
    """A BlackMamba directory as a :class:`Checkpoint` (not yet validated); ``config``: its parsed config.json."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG, directory / WEIGHTS
    cfg = config_from_json(config if config is not None else read_json(cfg_path), cfg_path)
    obj = torch_load_safe(weights)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{weights}: expected a BlackMamba checkpoint holding {{'model': state_dict}}, got "
                              + (f"keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else type(obj).__name__))
    raw = check_tensor_dict(obj.pop("model"), weights, " ['model']")
    del obj
    head = raw.pop(_TIED_HEAD, None)
    experts = _stack_experts(raw, cfg, weights)
    sd = rename_to_internal(raw, KEYS, weights)
    sd.update(experts)
    if head is not None:
        emb = sd.get("embedding.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
            raise CheckpointError(f"checkpoint {weights}: {_TIED_HEAD!r} differs from the embedding; BlackMamba "
                                  "ties the output head to the embedding")
    manifest = source_manifest(FORMAT, directory, hash_files(directory, [CONFIG, WEIGHTS], hash_weights), sd)
    return Checkpoint(directory, FORMAT, cfg, sd, manifest, weights, KEYS.to_source)


def _file_order(key: str):
    """Embedding first, then layer by layer (experts in index order), final norm last: as the published file."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    if m:
        expert = re.match(r"mixer\.local_experts\.(\d+)\.(.*)", m.group(2))
        return (1, int(m.group(1)), (1, int(expert.group(1)), expert.group(2)) if expert else (0, 0, m.group(2)))
    return (0 if key.startswith("embedding") else 2, 0, (0, 0, key))


def write(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path) -> None:
    """Write ``state_dict`` (internal names; consumed) as ``{"model": ...}`` into ``out_dir``.

    Tensors are written in the dtype given (the published checkpoints are bf16).
    """
    config = config_to_json(cfg)
    state_dict.pop("lm_head.weight", None)
    experts = _unstack_experts(state_dict)
    model = rename_to_source(state_dict, KEYS)
    model.update(experts)
    del experts
    model = OrderedDict((k, model[k]) for k in sorted(model, key=_file_order))
    torch.save({"model": model}, Path(out_dir) / WEIGHTS)
    write_json(Path(out_dir) / CONFIG, config)
