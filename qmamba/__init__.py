"""qmamba: low-bit quantized inference for BlackMamba (Mamba + top-1 MoE) and Mamba language models.

Public API (imported lazily so ``import qmamba`` stays cheap):
    qmamba.load_model(path, device=None, dtype=None) -> MambaLM
    qmamba.ModelConfig, qmamba.preset(name)
    qmamba.assets.default_model_path()  -> the built-in tiny BlackMamba
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "ModelConfig", "preset", "MambaLM", "generate"]


def __getattr__(name):
    if name in ("ModelConfig", "preset"):
        from qmamba import config

        return getattr(config, name)
    if name == "MambaLM":
        from qmamba.model import MambaLM

        return MambaLM
    if name == "load_model":
        from qmamba.checkpoints.load import load_model

        return load_model
    if name == "assets":  # qmamba.assets.default_model_path(): the built-in model
        import importlib

        return importlib.import_module("qmamba.assets")
    if name == "generate":
        from qmamba.generation import generate

        return generate
    raise AttributeError(f"module 'qmamba' has no attribute {name!r}")
