"""Checkpoint reading (BlackMamba, mamba_ssm, HF transformers Mamba, qmamba native), writing and loading.

    load_model(path, device=None, dtype=None, backend=None) -> MambaLM
    open_checkpoint(path) -> Checkpoint            # the one reader: config, state_dict, manifest, format, directory
    read_checkpoint(path) -> (ModelConfig, state_dict, manifest)
    save_checkpoint(model_or_state_dict, config, out_dir, ...) -> Path
"""

from __future__ import annotations

__all__ = ["load_model", "open_checkpoint", "read_checkpoint", "save_checkpoint", "detect_format"]


def __getattr__(name):
    if name == "load_model":
        from .load import load_model

        return load_model
    if name in ("open_checkpoint", "read_checkpoint", "detect_format"):
        from . import detect

        return getattr(detect, name)
    if name == "save_checkpoint":
        from .native import save_checkpoint

        return save_checkpoint
    raise AttributeError(f"module 'qmamba.checkpoints' has no attribute {name!r}")
