"""Two-way renaming between a source format's tensor names and qmamba's internal names.

A format is described by a list of ``(source pattern, internal pattern)`` rules. ``{i}`` matches a layer index,
``{rest}`` any dotted tail; the first rule that matches wins, in either direction. The Mamba mixer's depthwise
conv weight is stored ``[d_inner, 1, d_conv]`` in every source format and ``[d_inner, d_conv]`` internally.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qmamba.errors import CheckpointError

_FIELDS = {"i": r"(?P<i>\d+)", "rest": r"(?P<rest>[A-Za-z0-9_.]+)"}


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{i\}|\{rest\})", pattern)
    regex = "".join(_FIELDS[p[1:-1]] if p in ("{i}", "{rest}") else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


class KeyMap:
    """Bidirectional rule list; see the module docstring."""

    def __init__(self, rules: list[tuple[str, str]]):
        self.rules = [(src, dst, _compile(src), _compile(dst)) for src, dst in rules]

    def to_internal(self, source_name: str) -> str | None:
        for src, dst, src_re, _ in self.rules:
            m = src_re.match(source_name)
            if m:
                return dst.format(**m.groupdict())
        return None

    def to_source(self, internal_name: str) -> str:
        for src, dst, _, dst_re in self.rules:
            m = dst_re.match(internal_name)
            if m:
                return src.format(**m.groupdict())
        return internal_name


def mixer_rules(source_layer: str, internal_layer: str = "layers.{i}") -> list[tuple[str, str]]:
    """Mamba-mixer renames shared by BlackMamba, mamba_ssm and HF (plus an identity catch-all)."""
    s, t = f"{source_layer}.mixer", f"{internal_layer}.mixer"
    return [
        (f"{s}.conv1d.weight", f"{t}.conv_weight"),
        (f"{s}.conv1d.bias", f"{t}.conv_bias"),
        (f"{s}.dt_proj.bias", f"{t}.dt_bias"),
        (f"{source_layer}.norm.weight", f"{internal_layer}.norm.weight"),
        (f"{s}.{{rest}}", f"{t}.{{rest}}"),
    ]


def is_conv_weight(internal_name: str) -> bool:
    return internal_name.endswith(".mixer.conv_weight")


def rename_to_internal(source_sd: dict[str, torch.Tensor], keymap: KeyMap, file: Path) -> dict[str, torch.Tensor]:
    """Pop every tensor of ``source_sd`` into a new dict under its internal name (memory stays flat).

    Conv weights ``[di, 1, w]`` become ``[di, w]``; any other shape is kept so validation reports it by name.
    """
    out = {}
    for name in list(source_sd):
        internal = keymap.to_internal(name)
        if internal is None:
            raise CheckpointError(f"checkpoint {file}: unexpected key {name!r}")
        if internal in out:
            raise CheckpointError(f"checkpoint {file}: key {name!r} duplicates another key")
        tensor = source_sd.pop(name)
        if is_conv_weight(internal) and tensor.ndim == 3 and tensor.shape[1] == 1:
            tensor = tensor[:, 0, :]
        out[internal] = tensor
    return out


def rename_to_source(internal_sd: dict[str, torch.Tensor], keymap: KeyMap) -> dict[str, torch.Tensor]:
    """Pop every tensor of ``internal_sd`` into a new dict under its source name; conv weights get ``[di, 1, w]``."""
    out = {}
    for name in list(internal_sd):
        tensor = internal_sd.pop(name)
        if is_conv_weight(name):
            tensor = tensor.unsqueeze(1)
        out[keymap.to_source(name)] = tensor.contiguous()
    return out
