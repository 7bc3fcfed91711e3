"""One checkpoint as read from disk, before any model exists: what every format reader returns.

A reader (``read`` of :mod:`.blackmamba`, :mod:`.mamba_ssm`, :mod:`.hf_mamba`, :mod:`.native`) fills a
:class:`Checkpoint` with internal-name CPU tensors; :meth:`Checkpoint.validate` then checks them against the config
with the float model built once on the ``meta`` device (:attr:`skeleton`), which
:func:`qmamba.checkpoints.load.build_model` fills with the tensors afterwards (so one load builds one model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qmamba.config import ModelConfig

from .shapes import meta_model, validate_state_dict


@dataclass
class Checkpoint:
    directory: Path
    format: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    manifest: dict
    weights: Path                                     # the file that validation messages name
    source_key: Callable[[str], str] | None = None    # internal name -> name in that file (for messages)
    skeleton: nn.Module | None = None                 # the float model on "meta", set by validate()

    def as_tuple(self) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
        return self.config, self.state_dict, self.manifest

    def validate(self) -> "Checkpoint":
        """Raise a :class:`qmamba.errors.CheckpointError` naming the keys unless the tensors fit the config."""
        if self.skeleton is None:
            self.skeleton = meta_model(self.config)
        validate_state_dict(self.state_dict, self.config, self.weights, source_key=self.source_key,
                            quantization=self.manifest.get("quantization"), model=self.skeleton)
        return self
