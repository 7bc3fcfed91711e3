"""state-spaces ``mamba_ssm`` checkpoints: ``pytorch_model.bin`` (plain state dict) + ``config.json``.

Config: ``d_model, n_layer, vocab_size, ssm_cfg {d_state, d_conv, expand, dt_rank, conv_bias, bias, layer},
rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple, tie_embeddings`` (+ ``d_intermediate``,
``attn_layer_idx`` in later versions). The embedding holds the vocabulary padded up to a multiple of
``pad_vocab_size_multiple``; qmamba's ``ModelConfig.vocab_size`` is that padded size (the unpadded size is kept
in ``extra["source_vocab_size"]``). The tied head may or may not be stored (``lm_head.weight``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qmamba.config import MAX_LAYERS, ModelConfig
from qmamba.errors import CheckpointError, ConfigError

from .files import (check_tensor_dict, config_bool, config_int, hash_files, read_json, require_keys, torch_load_safe,
                    write_json)
from .keymap import KeyMap, mixer_rules, rename_to_internal, rename_to_source
from .manifest import source_manifest
from .record import Checkpoint

FORMAT = "mamba_ssm"
WEIGHTS = "pytorch_model.bin"
CONFIG = "config.json"

KEYS = KeyMap([
    ("backbone.embedding.weight", "embedding.weight"),
    ("backbone.norm_f.weight", "norm_f.weight"),
    ("backbone.norm_f.bias", "norm_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
    *mixer_rules("backbone.layers.{i}"),
])


def looks_like(directory: Path, config: dict | None) -> bool:
    return config is not None and "d_model" in config and "n_layer" in config


def config_from_json(data: dict, path: Path) -> ModelConfig:
    require_keys(data, ("d_model", "n_layer", "vocab_size"), path)
    ssm = data.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise ConfigError(f"config file {path}: ssm_cfg must be an object")
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ConfigError(f"config file {path}: ssm_cfg.layer={ssm['layer']!r} is not supported (only Mamba1)")
    if data.get("d_intermediate", 0):
        raise ConfigError(f"config file {path}: d_intermediate={data['d_intermediate']} (MLP blocks) is not supported")
    if data.get("attn_layer_idx"):
        raise ConfigError(f"config file {path}: attn_layer_idx (hybrid attention layers) is not supported")
    if not config_bool(data, "rms_norm", path, True):
        raise ConfigError(f"config file {path}: rms_norm=false (LayerNorm blocks) is not supported")
    multiple = 1 if data.get("pad_vocab_size_multiple", 8) is None else (
        config_int(data, "pad_vocab_size_multiple", path, default=8, minimum=0) or 1)
    vocab = config_int(data, "vocab_size", path)
    padded = -(-vocab // multiple) * multiple
    n_layers = config_int(data, "n_layer", path, maximum=MAX_LAYERS)
    dt_rank = ssm.get("dt_rank", "auto")
    d_model = config_int(data, "d_model", path)
    try:
        return ModelConfig(
            d_model=d_model, layers=["r"] * n_layers, vocab_size=padded,
            d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
            dt_rank=None if dt_rank == "auto" else dt_rank, final_norm="rmsnorm", norm_eps=1e-5,
            tie_embeddings=config_bool(data, "tie_embeddings", path, True),
            conv_bias=config_bool(ssm, "conv_bias", path, True), proj_bias=config_bool(ssm, "bias", path, False),
            family="mamba", pad_vocab_multiple=multiple,
            extra={"source_vocab_size": vocab, "residual_in_fp32": config_bool(data, "residual_in_fp32", path, True)})
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def config_to_json(cfg: ModelConfig) -> dict:
    if cfg.moe_layer_ids:
        raise ConfigError("the mamba_ssm format cannot hold MoE layers (use --format blackmamba or qmamba)")
    if cfg.final_norm != "rmsnorm":
        raise ConfigError("the mamba_ssm format needs final_norm='rmsnorm' (use --format blackmamba or qmamba)")
    if cfg.norm_eps != 1e-5:
        raise ConfigError("the mamba_ssm format has no norm epsilon field; norm_eps must be 1e-5")
    vocab = int(cfg.extra.get("source_vocab_size", cfg.vocab_size))
    multiple = cfg.pad_vocab_multiple
    if math.ceil(vocab / multiple) * multiple != cfg.vocab_size:
        vocab, multiple = cfg.vocab_size, 1
    ssm = {"d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand}
    if cfg.dt_rank != math.ceil(cfg.d_model / 16):
        ssm["dt_rank"] = cfg.dt_rank
    if not cfg.conv_bias:
        ssm["conv_bias"] = False
    if cfg.proj_bias:
        ssm["bias"] = True
    return {"d_model": cfg.d_model, "n_layer": cfg.n_layers, "vocab_size": vocab, "ssm_cfg": ssm,
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
            "pad_vocab_size_multiple": multiple, "tie_embeddings": cfg.tie_embeddings}


def drop_tied_head(sd: dict, cfg: ModelConfig, file: Path, head: str = "lm_head.weight") -> None:
    """A tied head stored anyway must equal the embedding; it is then dropped."""
    if cfg.tie_embeddings and head in sd:
        stored, emb = sd.pop(head), sd.get("embedding.weight")
        if emb is not None and (stored.shape != emb.shape or not torch.equal(stored, emb)):
            raise CheckpointError(f"checkpoint {file}: {head!r} differs from the embedding but the config ties them")


def read(directory: Path, hash_weights: bool = True, config: dict | None = None) -> Checkpoint:
    """A mamba_ssm directory as a :class:`Checkpoint` (not yet validated); ``config``: its parsed config.json."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG, directory / WEIGHTS
    cfg = config_from_json(config if config is not None else read_json(cfg_path), cfg_path)
    raw = check_tensor_dict(torch_load_safe(weights), weights)
    sd = rename_to_internal(raw, KEYS, weights)
    drop_tied_head(sd, cfg, weights)
    manifest = source_manifest(FORMAT, directory, hash_files(directory, [CONFIG, WEIGHTS], hash_weights), sd)
    return Checkpoint(directory, FORMAT, cfg, sd, manifest, weights, KEYS.to_source)


def write(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path) -> None:
    """Write ``state_dict`` (internal names; consumed) into the existing directory ``out_dir``."""
    config = config_to_json(cfg)
    if cfg.tie_embeddings:  # mamba_ssm's state_dict() stores the tied head under both names
        state_dict["lm_head.weight"] = state_dict["embedding.weight"]
    torch.save(rename_to_source(state_dict, KEYS), Path(out_dir) / WEIGHTS)
    write_json(Path(out_dir) / CONFIG, config)
