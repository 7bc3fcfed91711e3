"""The checkpoint manifest: what a checkpoint is, where it came from, how it is stored.

Native qmamba checkpoints store it as ``manifest.json``::

    {"format": "qmamba", "format_version": 1, "dtype": "bfloat16",
     "source": {"format": "blackmamba", "path": "...", "files": {"pytorch_model.bin": "<sha256>"}},
     "quantization": null | {module_name: {"format": "int4", ...}},
     "qmamba_version": "0.1.0", "aliases": {name: name}, ...extra}

For a source-format checkpoint, :func:`source_manifest` builds the same structure in memory (``format`` is the
source format, ``source`` describes the files read), so a loaded model always carries one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from qmamba.errors import ConfigError

FORMAT_NAME = "qmamba"
FORMAT_VERSION = 1
RESERVED_KEYS = ("format", "format_version", "dtype", "source", "quantization", "qmamba_version", "aliases")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value) -> torch.dtype | None:
    """``None``, a torch dtype, or a name such as ``"bf16"``/``"float32"`` -> torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {value!r}; choose one of float32, bfloat16, float16")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dominant_float_dtype(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name of the floating dtype holding the most bytes (``None`` when there are no floating tensors)."""
    counts = Counter()
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[dtype_name(tensor.dtype)] += tensor.numel() * tensor.element_size()
    return counts.most_common(1)[0][0] if counts else None


def qmamba_version() -> str:
    """Installed qmamba version (from package metadata, which works however the package was installed)."""
    try:
        from importlib.metadata import version

        return version("qmamba")
    except Exception:  # noqa: BLE001 - not installed (running from a source tree)
        return "unknown"


def source_manifest(fmt: str, path: Path, files: dict[str, str | None],
                    state_dict: dict[str, torch.Tensor]) -> dict:
    """In-memory manifest describing a checkpoint read from a source format."""
    return {
        "format": fmt,
        "format_version": None,
        "dtype": dominant_float_dtype(state_dict),
        "source": {"format": fmt, "path": str(Path(path).absolute()), "files": dict(files)},
        "quantization": None,
        "qmamba_version": qmamba_version(),
    }


def int8_activation_check(manifest: dict) -> dict | None:
    """``qmamba quantize``'s int8-activation check as the manifest records it
    (``quantization_info.int8_activations``, :mod:`qmamba.calib.int8_check`), or None."""
    return (manifest.get("quantization_info") or {}).get("int8_activations")


def checkpoint_int8_activations(manifest: dict) -> bool:
    """Whether that check turned the W4A8 prefill on for this checkpoint: its ``prefill_default`` (a JSON boolean;
    anything else is off)."""
    check = int8_activation_check(manifest)
    return isinstance(check, dict) and check.get("prefill_default") is True
