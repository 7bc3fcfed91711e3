"""Checkpoint format auto-detection and the one reader of any supported format (:func:`open_checkpoint`).

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
from .record import Checkpoint

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
    """Local snapshot directory of a hub repository (weights, configs, tokenizer files); the error says why not."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("huggingface_hub is not installed to download it (pip install 'qmamba[hub]')") from None
    try:
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):  # mamba_ssm / BlackMamba repos ship pytorch_model.bin
            local = Path(snapshot_download(repo_id=repo_id, allow_patterns=[*HUB_PATTERNS, "*.bin"]))
        return local
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo, network error ...
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise CheckpointError(f"could not download it from the Hugging Face hub{offline}: {type(exc).__name__}: "
                              f"{one_line(exc, 160)}") from None


def resolve_checkpoint_dir(path) -> Path:
    """A local checkpoint directory for ``path`` (a directory, a file inside one, or a hub id).

    ``owner/name`` is taken for a hub id only when nothing named ``owner`` exists here: a missing ``runs/q4``
    beside an existing ``runs/`` is a path that does not exist, not a download."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.suffix in (".onnx", ".data") and ".onnx" in p.name:
        raise CheckpointError(f"{path} is an ONNX export, not a checkpoint (run it with: qmamba generate {path}); "
                              "info, eval, quantize, export and bench read the checkpoint directory it was exported from")
    if p.is_file():
        return p.parent
    text = str(path)
    if looks_like_hub_id(text) and not Path(text.split("/")[0]).expanduser().exists():
        try:
            return download_from_hub(text)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint path does not exist: {path}; as a Hugging Face hub id: {exc}") from None
    raise CheckpointError(f"checkpoint path does not exist: {path}")


def _detect(directory: Path) -> tuple[str, dict | None]:
    """``(format name, parsed config.json or None)`` of a local directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else None
    for name, module in FORMATS.items():
        if module.looks_like(directory, config):
            return name, config
    if config is None:
        present = sorted(p.name for p in directory.iterdir())[:8]
        raise CheckpointError(f"{directory} is not a checkpoint directory: no manifest.json or config.json "
                              f"(found {present})")
    raise CheckpointError(f"cannot tell the checkpoint format of {directory}: config.json has none of the keys "
                          "mamba_moe_layers (BlackMamba), d_model/n_layer (mamba_ssm), model_type 'mamba' (HF)")


def detect_format(directory: Path) -> str:
    """Name of the checkpoint format of a local directory (a key of ``FORMATS``)."""
    return _detect(directory)[0]


def detect_checkpoint(directory: Path) -> tuple[str, dict | None]:
    """``(format name, parsed config.json or None)`` of a local directory: what :func:`open_checkpoint` takes as
    ``detected`` when the caller looked at the config before reading the weights (config.json is parsed once)."""
    return _detect(directory)


def open_checkpoint(path, hash_files: bool = False, *, detected: tuple[str, dict | None] | None = None,
                    skeleton=None) -> Checkpoint:
    """The one checkpoint reader: ``path`` (a directory, a file inside one, or a hub id) in any supported format
    as a validated :class:`Checkpoint` (internal names, CPU tensors; its ``skeleton`` is the float model on
    ``meta`` that :func:`qmamba.checkpoints.load.build_model` fills). Every file is read once.

    ``hash_files``: record sha256 of source-format files in ``manifest["source"]["files"]`` (else ``None``).
    ``detected``: :func:`detect_checkpoint` of the directory, when the caller has it; ``skeleton``: the float model
    of this config on ``meta`` when the caller built one already (the quantizer plans on it before reading)."""
    directory = resolve_checkpoint_dir(path)
    fmt, config = detected if detected is not None else _detect(directory)
    checkpoint = FORMATS[fmt].read(directory, hash_weights=hash_files, config=config)
    if skeleton is not None:
        checkpoint.skeleton = skeleton
    return checkpoint.validate()


def read_checkpoint(path, hash_files: bool = True):
    """``(config, state_dict, manifest)`` of :func:`open_checkpoint` (source files hashed by default)."""
    return open_checkpoint(path, hash_files=hash_files).as_tuple()
