"""qmamba's own checkpoint directory: ``model.safetensors`` + ``config.json`` (``ModelConfig.to_dict``) +
``manifest.json`` (see :mod:`qmamba.checkpoints.manifest`) + optionally ``tokenizer.json``.

Public API::

    save_checkpoint(model_or_state_dict, config, out_dir, *, source=None, quantization=None, extra=None,
                    tokenizer_file=None, overwrite=False, dtype=None) -> Path
    read(directory) -> (config, state_dict, manifest)    # this format (any format: qmamba.checkpoints.read_checkpoint)

Writes are atomic (a temporary directory beside ``out_dir``, renamed at the end). A tied head is not stored.
Tensors that share memory are stored once and recorded in ``manifest["aliases"]``. When
``manifest["quantization"]`` is a dict ``{module_name: {"format": ...}}``, the state dict holds that module's
packed tensors (``<module>.qweight``, ``.scales`` ...), which :mod:`qmamba.quant.modules` validates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qmamba.config import ModelConfig
from qmamba.errors import CheckpointError, ConfigError

from .files import (atomic_output_dir, check_output_dir, check_tokenizer_file, copy_tokenizer, read_json,
                    safetensors_load, write_json)
from .manifest import (FORMAT_NAME, FORMAT_VERSION, RESERVED_KEYS, dominant_float_dtype, parse_dtype,
                       qmamba_version)
from .record import Checkpoint
from .shapes import is_quantized_tensor, quantized_names, validate_state_dict

FORMAT = FORMAT_NAME
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"


def looks_like(directory: Path, config: dict | None) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _prepare_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors with no shared storage, plus ``{alias: stored name}`` for exact duplicates."""
    out, aliases, first_by_view, used_storages = {}, {}, {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise CheckpointError(f"cannot save tensor {name!r}: it is on the meta device (never loaded)")
        key = _storage_key(tensor)
        if tensor.numel() and key in first_by_view:
            aliases[name] = first_by_view[key]
            continue
        first_by_view[key] = name
        cpu = tensor.to("cpu").contiguous()
        ptr = cpu.untyped_storage().data_ptr()
        if cpu.numel() and (ptr in used_storages or cpu.untyped_storage().nbytes() != cpu.numel() * cpu.element_size()):
            cpu = cpu.clone()  # partial view or storage shared with another stored tensor
        used_storages.add(cpu.untyped_storage().data_ptr())
        out[name] = cpu
    return out, aliases


def save_checkpoint(model_or_state_dict, config: ModelConfig, out_dir, *, source: dict | None = None,
                    quantization: dict | None = None, extra: dict | None = None, tokenizer_file=None,
                    overwrite: bool = False, dtype=None) -> Path:
    """Write a native qmamba checkpoint directory atomically; returns its path.

    ``model_or_state_dict``: a :class:`MambaLM` (or any module with internal names) or a state dict.
    ``dtype``: cast floating non-quantized tensors before writing (default: keep). ``source``: the
    ``manifest["source"]`` of the checkpoint this one derives from. ``extra``: more top-level manifest keys.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    check_tokenizer_file(tokenizer_file)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ConfigError(f"extra manifest keys {clash} are reserved")
    if quantization is not None and not isinstance(quantization, dict):
        raise ConfigError("quantization must be a dict {module_name: {...}} or None")
    cast = parse_dtype(dtype)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    skip = quantized_names(quantization)
    if config.tie_embeddings and not is_quantized_tensor("lm_head.weight", skip):
        sd.pop("lm_head.weight", None)
    if cast is not None:
        sd = {k: (v.to(cast) if v.is_floating_point() and not is_quantized_tensor(k, skip) else v)
              for k, v in sd.items()}
    validate_state_dict(sd, config, out_dir, quantization=quantization)
    tensors, aliases = _prepare_tensors(sd)
    del sd
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": dominant_float_dtype(tensors),
                "source": source, "quantization": quantization, "qmamba_version": qmamba_version(), **extra}
    if aliases:
        manifest["aliases"] = aliases
    json.dumps(manifest)  # fail before writing anything if it is not JSON-serialisable
    from safetensors.torch import save_file

    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / CONFIG, config.to_dict())
        write_json(tmp / MANIFEST, manifest)
        copy_tokenizer(tokenizer_file, tmp)
    return out_dir


def read(directory: Path, hash_weights: bool = True, config: dict | None = None) -> Checkpoint:
    """A native checkpoint as a :class:`Checkpoint` (not yet validated; ``hash_weights`` unused: hashes are
    stored); ``config``: its parsed config.json."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST, "manifest")
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"manifest {directory / MANIFEST}: format is {manifest.get('format')!r}, "
                              f"expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise CheckpointError(f"manifest {directory / MANIFEST}: format_version {version!r} is not supported "
                              f"(this qmamba reads 1..{FORMAT_VERSION}; upgrade qmamba)")
    quantization = manifest.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        raise CheckpointError(f"manifest {directory / MANIFEST}: quantization must be an object or null")
    try:
        cfg = ModelConfig.from_dict(config if config is not None else read_json(directory / CONFIG))
    except ConfigError as exc:
        raise ConfigError(f"config file {directory / CONFIG}: {exc}") from None
    weights = directory / WEIGHTS
    sd = safetensors_load(weights)
    aliases = manifest.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"manifest {directory / MANIFEST}: aliases must be an object of name -> name")
    for alias, target in aliases.items():
        if target not in sd:
            raise CheckpointError(f"manifest {directory / MANIFEST}: alias {alias!r} points to missing key {target!r}")
        sd[alias] = sd[target]
    return Checkpoint(directory, FORMAT, cfg, sd, manifest, weights)

