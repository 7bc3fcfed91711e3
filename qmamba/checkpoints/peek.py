"""What a checkpoint holds without reading its weights: the config, the manifest, and the name, shape, dtype and
size of every stored tensor (``qmamba info``, and the tokenizer choice before a model is loaded).

Safetensors files are described from their JSON header alone; pickles (``pytorch_model.bin``) are opened with
``torch.load(..., mmap=True, weights_only=True)``, so their tensors are memory-mapped views whose data is never
touched. :func:`validate_specs` checks names and shapes against the config as the readers do, on ``meta`` tensors
(the same key maps, expert stacking and :func:`qmamba.checkpoints.shapes.validate_state_dict`); what needs the
values (a stored tied head equal to the embedding) is left to loading.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qmamba.config import ModelConfig
from qmamba.errors import CheckpointError, ConfigError

from . import blackmamba, hf_mamba, mamba_ssm, native
from .detect import FORMATS, detect_format, resolve_checkpoint_dir
from .files import check_tensor_dict, one_line, read_json, torch_load_safe
from .keymap import rename_to_internal
from .manifest import dtype_name
from .shapes import validate_state_dict

# safetensors dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                      "U64": "uint64"}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit
# source names of a tied head that a reader drops (it equals the embedding)
TIED_HEAD_KEYS = {blackmamba.FORMAT: "output_layer.weight", mamba_ssm.FORMAT: "lm_head.weight",
                  hf_mamba.FORMAT: "lm_head.weight"}


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: source name, shape, dtype name (``"bfloat16"``), bytes, and whether its data is another
    entry's (a pickle stores tensors that share storage once)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    shared: bool = False


def config_of(directory: Path, fmt: str, raw: dict | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a local checkpoint directory of format ``fmt`` (``config.json`` only; ``raw``:
    its parsed content when the caller has it)."""
    directory = Path(directory)
    path = directory / "config.json"
    raw = raw if raw is not None else read_json(path)
    if fmt == native.FORMAT:
        try:
            return ModelConfig.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    return FORMATS[fmt].config_from_json(raw, path)


def read_config(path) -> tuple[Path, ModelConfig]:
    """``(local directory, config)`` of the checkpoint at ``path`` (directory, file inside one, or hub id)."""
    directory = resolve_checkpoint_dir(path)
    return directory, config_of(directory, detect_format(directory))


def manifest_of(directory: Path, fmt: str) -> dict:
    """``manifest.json`` of a native checkpoint; ``{}`` for source formats (their manifest is built on reading)."""
    return read_json(Path(directory) / native.MANIFEST, "manifest") if fmt == native.FORMAT else {}


def safetensors_specs(path: Path) -> list[TensorSpec]:
    """Tensors of a safetensors file from its header (8-byte little-endian length, then JSON)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"weights file not found: {path}") from None
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read safetensors header of {path} (truncated or corrupt?): "
                              f"{one_line(exc, 160)}") from None
    specs, data_end = [], 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            specs.append(TensorSpec(name, tuple(int(d) for d in entry["shape"]),
                                    SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower()), int(end - begin)))
            data_end = max(data_end, int(end))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"safetensors header of {path}: bad entry for {name!r}") from None
    size = path.stat().st_size
    if 8 + length + data_end > size:
        raise CheckpointError(f"safetensors file {path} is truncated: its header describes {8 + length + data_end} "
                              f"bytes, the file has {size}")
    return specs


def pickle_specs(path: Path, inner_key: str | None = None) -> list[TensorSpec]:
    """Tensors of a torch pickle, memory-mapped (their data is not read); tensors sharing storage count once."""
    obj = torch_load_safe(path, mmap=True)
    if inner_key is not None:
        if not isinstance(obj, dict) or inner_key not in obj:
            raise CheckpointError(f"{path}: expected a checkpoint holding {{{inner_key!r}: state_dict}}")
        obj = obj[inner_key]
    tensors = check_tensor_dict(obj, path)
    seen, specs = set(), []
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        specs.append(TensorSpec(name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size(),
                                shared=bool(t.numel()) and key in seen))
        seen.add(key)
    return specs


def weights_file(directory: Path, fmt: str) -> Path:
    """The weights file named in messages (the index of a sharded checkpoint)."""
    directory = Path(directory)
    if fmt == hf_mamba.FORMAT:
        for name in (hf_mamba.SAFETENSORS, hf_mamba.INDEX, hf_mamba.PICKLE):
            if (directory / name).is_file():
                return directory / name
    return directory / FORMATS[fmt].WEIGHTS


def tensor_specs(directory: Path, fmt: str, cfg: ModelConfig | None = None) -> list[TensorSpec]:
    """The tensors stored by the checkpoint in ``directory`` (format ``fmt``), without reading their data.

    A stored copy of a tied head (which the readers drop after checking it equals the embedding) is left out.
    """
    directory = Path(directory)
    if fmt == native.FORMAT:
        specs = safetensors_specs(directory / native.WEIGHTS)
    elif fmt == blackmamba.FORMAT:
        specs = pickle_specs(directory / blackmamba.WEIGHTS, inner_key="model")
    elif fmt == mamba_ssm.FORMAT:
        specs = pickle_specs(directory / mamba_ssm.WEIGHTS)
    elif fmt == hf_mamba.FORMAT:
        if (directory / hf_mamba.SAFETENSORS).is_file():
            specs = safetensors_specs(directory / hf_mamba.SAFETENSORS)
        elif (directory / hf_mamba.INDEX).is_file():
            index = read_json(directory / hf_mamba.INDEX, "safetensors index")
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise CheckpointError(f"safetensors index {directory / hf_mamba.INDEX} has no weight_map")
            specs = [s for shard in shards for s in safetensors_specs(directory / Path(shard).name)]
        elif (directory / hf_mamba.PICKLE).is_file():
            specs = pickle_specs(directory / hf_mamba.PICKLE)
        else:
            raise CheckpointError(f"no weights in {directory}: expected {hf_mamba.SAFETENSORS}, {hf_mamba.INDEX} "
                                  f"or {hf_mamba.PICKLE}")
    else:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}")
    tied = TIED_HEAD_KEYS.get(fmt)
    if tied and (cfg is None or cfg.tie_embeddings):
        specs = [s for s in specs if s.name != tied]
    return specs


def validate_specs(directory: Path, fmt: str, cfg: ModelConfig, specs: list[TensorSpec], manifest: dict) -> None:
    """Names and shapes of ``specs`` against ``cfg``, as the format's reader checks them (``CheckpointError``
    naming the key and file), on ``meta`` tensors: no data is read."""
    weights = weights_file(directory, fmt)
    meta = {s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype, torch.uint8), device="meta") for s in specs}
    if fmt == native.FORMAT:
        quantization = manifest.get("quantization")
        for alias, target in (manifest.get("aliases") or {}).items():
            if target not in meta:
                raise CheckpointError(f"manifest {Path(directory) / native.MANIFEST}: alias {alias!r} points to "
                                      f"missing key {target!r}")
            meta[alias] = meta[target]
        validate_state_dict(meta, cfg, weights, quantization=quantization)
        return
    module = FORMATS[fmt]
    experts = blackmamba._stack_experts(meta, cfg, weights) if fmt == blackmamba.FORMAT else {}
    sd = rename_to_internal(meta, module.KEYS, weights)
    sd.update(experts)
    validate_state_dict(sd, cfg, weights, source_key=module.KEYS.to_source)
