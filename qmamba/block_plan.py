"""The block plan: the model's blocks listed once, in forward order, for everything that walks them.

:func:`block_plan` reads a :class:`qmamba.config.ModelConfig` into one :class:`BlockSpec` per block -- its index,
its mixer kind (``"mamba"`` or ``"moe"``), its expert count and, for a Mamba block, its slot in the stacked state
tensors of :mod:`qmamba.state`. The ONNX graph builder walks these specs (it works from checkpoint tensors, with no
model). :class:`qmamba.model.MambaLM` builds them once at construction into :class:`ModelBlock` records that add
the block's modules; prefill, step, the fused decode step, calibration and the training helpers walk
``model.blocks`` instead of ``model.layers`` with type checks and their own slot counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

MAMBA = "mamba"
MOE = "moe"
MAMBA_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")  # a Mamba mixer's linears, in forward order
EXPERT_STACKS = ("fc1", "fc2")  # an MoE mixer's stacked expert weights, in forward order


@dataclass(frozen=True)
class BlockSpec:
    """One block of the layer plan. ``slot``: position in the stacked state tensors (Mamba blocks; None for MoE).
    ``n_experts``: 0 for a Mamba block."""

    index: int
    kind: str
    n_experts: int
    slot: int | None

    @property
    def is_mamba(self) -> bool:
        return self.kind == MAMBA

    @property
    def name(self) -> str:
        """The block's module name in the model and the checkpoint (``layers.{index}``)."""
        return f"layers.{self.index}"

    @property
    def mixer_name(self) -> str:
        return f"{self.name}.mixer"

    def quantizable_modules(self) -> dict[str, str]:
        """``{manifest name: kind}`` of the block's quantizable weights, in forward order."""
        if self.is_mamba:
            return {f"{self.mixer_name}.{leaf}": leaf for leaf in MAMBA_LINEARS}
        return {f"{self.mixer_name}.experts.{which}": f"experts.{which}" for which in EXPERT_STACKS}


def block_plan(cfg) -> tuple[BlockSpec, ...]:
    """The blocks of ``cfg`` (a :class:`qmamba.config.ModelConfig`) in forward order."""
    specs, slot = [], 0
    for index, (kind, n_experts) in enumerate(cfg.layer_kinds):
        specs.append(BlockSpec(index, kind, n_experts, slot if kind == MAMBA else None))
        slot += kind == MAMBA
    return tuple(specs)


@dataclass(frozen=True)
class ModelBlock(BlockSpec):
    """A :class:`BlockSpec` with the model's block module (``norm`` + ``mixer``). ``norm`` and ``mixer`` are read
    from the module at each use, so a swapped submodule is seen."""

    module: nn.Module

    @property
    def norm(self) -> nn.Module:
        return self.module.norm

    @property
    def mixer(self) -> nn.Module:
        return self.module.mixer
