"""HF transformers ``MambaForCausalLM`` checkpoints: ``config.json`` (``model_type: "mamba"``) with
``model.safetensors``, a sharded ``model.safetensors.index.json``, or (older repos) ``pytorch_model.bin``.

Keys: ``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*``
(mamba_ssm names), ``backbone.norm_f.weight``; ``lm_head.weight`` omitted when ``tie_word_embeddings``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qmamba.config import MAX_LAYERS, ModelConfig
from qmamba.errors import CheckpointError, ConfigError

from .files import (check_tensor_dict, config_bool, config_int, hash_files, read_json, require_keys,
                    safetensors_load, torch_load_safe, write_json)
from .keymap import KeyMap, mixer_rules, rename_to_internal, rename_to_source
from .mamba_ssm import drop_tied_head
from .manifest import source_manifest
from .record import Checkpoint

FORMAT = "hf"
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"

KEYS = KeyMap([
    ("backbone.embeddings.weight", "embedding.weight"),
    ("backbone.norm_f.weight", "norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
    *mixer_rules("backbone.layers.{i}"),
])

UNSUPPORTED_MODEL_TYPES = {"mamba2": "Mamba-2", "falcon_mamba": "FalconMamba (extra B/C/dt norms)",
                           "jamba": "Jamba", "zamba": "Zamba", "bamba": "Bamba"}


def looks_like(directory: Path, config: dict | None) -> bool:
    if config is None:
        return False
    model_type = config.get("model_type")
    return (isinstance(model_type, str) and model_type in ("mamba", *UNSUPPORTED_MODEL_TYPES)) or (
        "state_size" in config and "num_hidden_layers" in config)


def config_from_json(data: dict, path: Path) -> ModelConfig:
    model_type = data.get("model_type", "mamba")
    if not isinstance(model_type, str):
        raise ConfigError(f"config file {path}: model_type must be a string, got {model_type!r}")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config file {path}: model_type {model_type!r} "
                          f"({UNSUPPORTED_MODEL_TYPES[model_type]}) is not supported")
    if model_type != "mamba":
        raise ConfigError(f"config file {path}: model_type {model_type!r} is not a Mamba model")
    require_keys(data, ("hidden_size", "num_hidden_layers", "vocab_size"), path)
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config file {path}: hidden_act={data['hidden_act']!r} is not supported (only silu)")
    hidden, expand = config_int(data, "hidden_size", path), config_int(data, "expand", path, default=2)
    if data.get("intermediate_size", hidden * expand) != hidden * expand:
        raise ConfigError(f"config file {path}: intermediate_size must equal expand * hidden_size")
    n_layers = config_int(data, "num_hidden_layers", path, maximum=MAX_LAYERS)
    rank = data.get("time_step_rank", "auto")
    vocab, d_state = config_int(data, "vocab_size", path), config_int(data, "state_size", path, default=16)
    d_conv = config_int(data, "conv_kernel", path, default=4)
    try:
        return ModelConfig(
            d_model=hidden, layers=["r"] * n_layers, vocab_size=vocab, d_state=d_state, d_conv=d_conv,
            expand=expand,
            dt_rank=None if rank == "auto" else rank, final_norm="rmsnorm",
            norm_eps=data.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=config_bool(data, "tie_word_embeddings", path, True),
            conv_bias=config_bool(data, "use_conv_bias", path, True),
            proj_bias=config_bool(data, "use_bias", path, False),
            family="mamba", extra={"residual_in_fp32": config_bool(data, "residual_in_fp32", path, True)})
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def config_to_json(cfg: ModelConfig) -> dict:
    if cfg.moe_layer_ids:
        raise ConfigError("the hf format cannot hold MoE layers (use --format blackmamba or qmamba)")
    if cfg.final_norm != "rmsnorm":
        raise ConfigError("the hf format needs final_norm='rmsnorm' (use --format blackmamba or qmamba)")
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "state_size": cfg.d_state, "num_hidden_layers": cfg.n_layers,
        "expand": cfg.expand, "intermediate_size": cfg.d_inner, "conv_kernel": cfg.d_conv,
        "time_step_rank": cfg.dt_rank, "use_bias": cfg.proj_bias, "use_conv_bias": cfg.conv_bias,
        "hidden_act": "silu", "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": True,
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
    }


def _load_sharded(directory: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    index_path = directory / INDEX
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"safetensors index {index_path} has no weight_map")
    shards = sorted(set(weight_map.values()))
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        if Path(shard).name != shard:
            raise CheckpointError(f"safetensors index {index_path}: shard name {shard!r} is not a plain file name")
        for key, tensor in safetensors_load(directory / shard).items():
            if weight_map.get(key) != shard:
                raise CheckpointError(f"shard {directory / shard}: key {key!r} is not listed for it in {INDEX}")
            sd[key] = tensor
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise CheckpointError(f"key {missing[0]!r} listed in {index_path} is missing from {weight_map[missing[0]]}")
    return sd, [INDEX, *shards]


def read(directory: Path, hash_weights: bool = True, config: dict | None = None) -> Checkpoint:
    """A transformers Mamba directory as a :class:`Checkpoint` (not yet validated); ``config``: its parsed
    config.json."""
    directory = Path(directory)
    cfg_path = directory / CONFIG
    cfg = config_from_json(config if config is not None else read_json(cfg_path), cfg_path)
    if (directory / SAFETENSORS).is_file():
        weights, raw, files = directory / SAFETENSORS, safetensors_load(directory / SAFETENSORS), [SAFETENSORS]
    elif (directory / INDEX).is_file():
        weights = directory / INDEX
        raw, files = _load_sharded(directory)
    elif (directory / PICKLE).is_file():
        weights, files = directory / PICKLE, [PICKLE]
        raw = check_tensor_dict(torch_load_safe(weights), weights)
    else:
        raise CheckpointError(f"no weights in {directory}: expected {SAFETENSORS}, {INDEX} or {PICKLE}")
    sd = rename_to_internal(raw, KEYS, weights)
    drop_tied_head(sd, cfg, weights)
    manifest = source_manifest(FORMAT, directory, hash_files(directory, [CONFIG, *files], hash_weights), sd)
    return Checkpoint(directory, FORMAT, cfg, sd, manifest, weights, KEYS.to_source)


def write(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path,
          max_shard_bytes: int | None = None) -> None:
    """Write ``state_dict`` (internal names; consumed) into ``out_dir``; shard when ``max_shard_bytes`` is set."""
    from safetensors.torch import save_file

    config = config_to_json(cfg)
    if cfg.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    sd = rename_to_source(state_dict, KEYS)
    out_dir = Path(out_dir)
    if max_shard_bytes is None:
        save_file(sd, str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in sd.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        weight_map, total = {}, 0
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out_dir / CONFIG, config)
