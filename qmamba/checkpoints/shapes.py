"""The tensors a config implies, and validation of a state dict against them before any model is built.

Internal names are those of :class:`qmamba.model.MambaLM` (``layers.{i}.mixer.in_proj.weight`` ...). The expected
shapes come from building the model on the ``meta`` device (:func:`meta_model`), so they can never drift from the
model code; a loader validates with the very model it then fills. A tied
head (``lm_head.weight``) is not expected. Tensors of quantized modules (named in the manifest's
``quantization`` map) are skipped here: :mod:`qmamba.quant.modules` validates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from qmamba.config import ModelConfig
from qmamba.errors import CheckpointError

MAX_REPORTED = 4


def meta_model(cfg: ModelConfig):
    """The float :class:`qmamba.model.MambaLM` of ``cfg`` on the ``meta`` device (no memory for weights)."""
    from qmamba.model import MambaLM  # model imports are heavier; keep this module cheap to import

    with torch.device("meta"):
        return MambaLM(cfg)


def expected_shapes(cfg: ModelConfig, model=None) -> dict[str, tuple[int, ...]]:
    """``{internal name: shape}`` of every tensor a checkpoint for ``cfg`` stores (tied head excluded).

    ``model``: the float model of ``cfg`` when one is at hand (see :func:`meta_model`); else one is built."""
    model = model if model is not None else meta_model(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def quantized_names(quantization: dict | None) -> tuple[str, ...]:
    """Names of the quantized modules/weights of a quantization manifest (``{name: entry}`` or
    ``{"modules": {name: entry}}``)."""
    if not quantization:
        return ()
    if isinstance(quantization.get("modules"), dict):
        quantization = quantization["modules"]
    return tuple(quantization)


def is_quantized_tensor(name: str, names: tuple[str, ...]) -> bool:
    """Whether tensor ``name`` belongs to a quantized module or weight (``lm_head`` -> ``lm_head.qweight``;
    ``layers.1.mixer.experts.fc1`` -> ``layers.1.mixer.experts.fc1.scales``)."""
    return any(name == n or name.startswith(n + ".") for n in names)


def _shape_hint(name: str, shape: tuple, cfg: ModelConfig) -> str:
    if name.endswith("experts.fc1") and len(shape) == 3:
        if not cfg.expert_gated and shape[1] == 2 * cfg.ffn_hidden:
            return " (the experts look gated, but the config says non-gated: check swiglu / expert_gated)"
        if cfg.expert_gated and shape[1] == cfg.ffn_hidden:
            return " (the experts look non-gated, but the config says gated: check swiglu / expert_gated)"
    if name == "embedding.weight" and len(shape) == 2 and shape[0] != cfg.vocab_size:
        return f" (config vocab_size is {cfg.vocab_size}; check vocab padding)"
    return ""


def validate_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, file: Path | str, *,
                        source_key: Callable[[str], str] | None = None, quantization: dict | None = None,
                        model=None) -> None:
    """Raise :class:`CheckpointError` naming the key(s) and ``file`` unless ``state_dict`` fits ``cfg`` exactly.

    ``source_key`` maps an internal name to the name used in the file, for the message. ``model``: the float model
    of ``cfg`` on ``meta`` when the caller has one (:func:`expected_shapes`).
    """
    src = source_key or (lambda name: name)
    skip = quantized_names(quantization)
    expected = expected_shapes(cfg, model)
    problems = []
    for name, tensor in state_dict.items():
        if is_quantized_tensor(name, skip):
            continue
        if name not in expected:
            problems.append(f"unexpected key {src(name)!r}")
        elif tuple(tensor.shape) != expected[name]:
            problems.append(f"key {src(name)!r} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                            + _shape_hint(name, tuple(tensor.shape), cfg))
        elif not tensor.is_floating_point():
            problems.append(f"key {src(name)!r} has dtype {tensor.dtype}, expected a floating-point tensor")
    for name in expected:
        if not is_quantized_tensor(name, skip) and name not in state_dict:
            problems.append(f"missing key {src(name)!r}")
    if problems:
        more = f"; ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise CheckpointError(f"checkpoint {file} does not match its config: "
                              + "; ".join(problems[:MAX_REPORTED]) + more)
