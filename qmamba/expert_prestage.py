"""Prefill with the MoE experts dequantized ahead: while a block runs, a side stream dequantizes the next MoE
block's int8 / int4 expert stacks (fc1 and fc2) into one reused float buffer, and that block then runs the float
grouped GEMMs on it.

Why: in a long prefill the int4 grouped GEMM unpacks every weight tile once per row tile, and on the H200 it takes
~1.7x the float grouped GEMM's time at 2,048 tokens (benchmarks/results.md, session 22: fc1 219 against 134 us,
fc2 136 against 68), while one dequantization pass of a block's stacks is bandwidth-bound (~140 us) and the Mamba
block before it is mostly not (the selective scan runs at ~10% of its bytes floor). Overlapped, the pass hides
under that block. The cost is memory: one block's fc1 + fc2 in the compute dtype (273 MB for BlackMamba-2.8B in
bf16), held for the prefill.

On by :attr:`qmamba.kernels.matmul_configs.MatmulPolicy.prestage_experts_min_m` (a minimum number of tokens);
``prestage_stacks`` names the stacks staged (fc2 alone: a third of the buffer).
:meth:`qmamba.model.MambaLM._prefill` calls :meth:`ExpertPrestage.before_block` before each block and hands the
MoE block what :meth:`ExpertPrestage.take` returns. Without CUDA (the CPU reference of this path) the pass runs in
order on the one stream. Inside a CUDA-graph capture the side stream forks from the capturing stream and joins it
again at the MoE block, so the graph holds the same overlap.
"""

from __future__ import annotations

import torch

from qmamba.kernel_view import expert_weight
from qmamba.kernels.dequantize import dequantize_stack
from qmamba.kernels.matmul_configs import MatmulPolicy, current_policy
from qmamba.kernels.weights import FMT_FLOAT, PackedWeight

STACKS = ("fc1", "fc2")
_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _stageable(weight) -> bool:
    """A stack worth dequantizing ahead: packed int8 / int4 (not float, not 1-bit)."""
    return isinstance(weight, PackedWeight) and weight.fmt != FMT_FLOAT


class ExpertPrestage:
    """One prefill's staging of MoE expert stacks (see the module docstring). Build it with :meth:`for_prefill`."""

    def __init__(self, blocks, dtype: torch.dtype, device: torch.device, stacks: tuple[str, ...] = STACKS):
        unknown = set(stacks) - set(STACKS)
        if unknown or not stacks:
            raise ValueError(f"expert prestage: stacks must be some of {STACKS}, got {stacks}")
        self.dtype, self.device = dtype, device
        # per MoE block index: its (fc1, fc2) records, the staged ones packed int8 / int4
        self._records: dict[int, dict[str, PackedWeight]] = {}
        for block in blocks:
            if not block.is_mamba and getattr(block.mixer, "backend", None) == "triton":
                records = {name: expert_weight(block.mixer.experts, name) for name in STACKS}
                if all(_stageable(records[name]) for name in stacks):
                    self._records[block.index] = records
        self._names = tuple(name for name in STACKS if name in stacks)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._staged: dict[int, tuple[tuple, "torch.cuda.Event | None"]] = {}
        self._stream = _side_stream(device) if device.type == "cuda" else None

    @classmethod
    def for_prefill(cls, model, tokens: int) -> "ExpertPrestage | None":
        """The staging of a prefill of ``tokens`` tokens (batch x length), or None where the policy leaves it off
        or no MoE block has packed int8 / int4 experts on the Triton backend."""
        policy: MatmulPolicy = current_policy()
        if policy.prestage_experts_min_m is None or tokens < policy.prestage_experts_min_m:
            return None
        stage = cls(model.blocks, model.compute_dtype, model.device, policy.prestage_stacks)
        return stage if stage._records else None

    @property
    def blocks(self) -> tuple[int, ...]:
        """The indices of the MoE blocks whose experts are staged."""
        return tuple(self._records)

    def _buffer(self, name: str, weight: PackedWeight) -> torch.Tensor:
        key = (name, weight.n_experts, weight.n, weight.k)
        if key not in self._buffers:  # allocated on the calling stream, before the side stream first writes it
            self._buffers[key] = torch.empty(weight.n_experts, weight.n, weight.k, device=self.device,
                                             dtype=self.dtype)
        return self._buffers[key]

    def _dequantize(self, records: dict[str, PackedWeight]) -> tuple:
        return tuple(PackedWeight.from_float(dequantize_stack(records[n], self.dtype, out=self._buffer(n, records[n])))
                     if n in self._names else records[n] for n in STACKS)

    def before_block(self, index: int) -> None:
        """Called before block ``index`` runs: starts the dequantization of block ``index + 1``'s experts if it is
        staged. The side stream first waits for everything issued so far, so the previous staged block's GEMMs
        (issued before this call) are done with the buffer before it is overwritten."""
        records = self._records.get(index + 1)
        if records is None:
            return
        if self._stream is None:
            self._staged[index + 1] = (self._dequantize(records), None)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            experts = self._dequantize(records)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._staged[index + 1] = (experts, done)

    def take(self, index: int) -> tuple | None:
        """``(fc1, fc2)`` of block ``index`` if it was staged, the staged ones float records (the calling stream
        then waits for their pass), else None (the block runs on its packed weights)."""
        staged = self._staged.pop(index, None)
        if staged is None:
            return None
        experts, done = staged
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        return experts
