"""Checkpoint format auto-detection and the one entry point that reads any supported format.

Detection looks at the directory, never at file names chosen by the user: ``manifest.json`` -> qmamba native;
``config.json`` with ``mamba_moe_layers`` (Megatron keys) -> BlackMamba; with ``d_model``/``n_layer`` ->
mamba_ssm; with ``model_type: "mamba"`` (or ``state_size``/``num_hidden_layers``) -> HF transformers.
A path that does not exist locally but looks like ``owner/name`` is downloaded with
``huggingface_hub.snapshot_download`` when that package is installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qmamba.errors import CheckpointError

from . import blackmamba, hf_mamba, mamba_ssm, native
from .files import one_line, read_json

# order matters: the first whose looks_like() accepts the directory wins
FORMATS = {
    native.FORMAT: native,
    blackmamba.FORMAT: blackmamba,
    mamba_ssm.FORMAT: mamba_ssm,
    hf_mamba.FORMAT: hf_mamba,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]  # pickles only when no safetensors exist


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/")) and ".." not in text


def download_from_hub(repo_id: str) -> Path:
    """Local snapshot directory of a hub repository (weights, configs, tokenizer files)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local path, and huggingface_hub is not installed to download "
                              "it as a hub id (pip install 'qmamba[hub]')") from None
    try:
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):  # mamba_ssm / BlackMamba repos ship pytorch_model.bin
            local = Path(snapshot_download(repo_id=repo_id, allow_patterns=[*HUB_PATTERNS, "*.bin"]))
        return local
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo, network error ...
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise CheckpointError(f"{repo_id!r} is not a local path and could not be downloaded from the Hugging Face "
                              f"hub{offline}: {type(exc).__name__}: {one_line(exc, 160)}") from None


def resolve_checkpoint_dir(path) -> Path:
    """A local checkpoint directory for ``path`` (a directory, a file inside one, or a hub id)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.suffix in (".onnx", ".data") and ".onnx" in p.name:
        raise CheckpointError(f"{path} is an ONNX export, not a checkpoint (run it with: qmamba generate {path}); "
                              "info, eval, quantize and export read the checkpoint directory it was exported from")
    if p.is_file():
        return p.parent
    if looks_like_hub_id(str(path)):
        return download_from_hub(str(path))
    raise CheckpointError(f"checkpoint path does not exist: {path}")


def detect_format(directory: Path) -> str:
    """Name of the checkpoint format of a local directory (a key of ``FORMATS``)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else None
    for name, module in FORMATS.items():
        if module.looks_like(directory, config):
            return name
    if config is None:
        present = sorted(p.name for p in directory.iterdir())[:8]
        raise CheckpointError(f"{directory} is not a checkpoint directory: no manifest.json or config.json "
                              f"(found {present})")
    raise CheckpointError(f"cannot tell the checkpoint format of {directory}: config.json has none of the keys "
                          "mamba_moe_layers (BlackMamba), d_model/n_layer (mamba_ssm), model_type 'mamba' (HF)")


def read_checkpoint(path, hash_files: bool = True):
    """``(config, state_dict, manifest)`` with internal names and CPU tensors; see :mod:`.native`."""
    directory = resolve_checkpoint_dir(path)
    fmt = detect_format(directory)
    return FORMATS[fmt].read(directory, hash_weights=hash_files)
