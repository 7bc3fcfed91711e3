"""The fused decode step as one persistent kernel launch (``DecodePolicy.persistent``; experimental, off by default).

:class:`PersistentDecodeStep` records the launches of one :class:`qmamba.fused_step.FusedDecodeStep` call for a
batch size (its Triton kernels replaced by recorders: nothing runs) and replays them through
:class:`qmamba.kernels.persistent.PersistentChain`: the same kernel bodies, arguments and order, with a grid barrier
in place of each kernel boundary (~0.9 us against ~3.7 us a dependent kernel on the H200). The recorded launches
point at the step's own buffers, a static token-id buffer and the state's tensors, so a chain is kept per
``(batch, state tensors)``; a call with another state records again (cheap: no kernel runs, the generated kernel is
compiled once). The registered bodies (:data:`qmamba.kernels.persistent.BODIES`) cover what the CUDA policy
launches at every batch size: the decode kernels, and at batch 2+ the general matmul kernel (its split-K outputs
accumulate into the step's workspace, which the step zeroes before each run, as the fused step does) and the conv
step. Where the fused step would launch anything else (another kernel, or PyTorch work inside the step), that batch
size runs on the plain fused step instead (:attr:`PersistentDecodeStep.fallback_batches` lists them).

The chain's kernels run without programmatic dependent launch (``pdl`` off: there is no next kernel). Its grid and
L2 prefetch and register cap follow ``DecodePolicy.persistent_programs`` / ``persistent_prefetch`` /
``persistent_maxnreg``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from qmamba.fused_step import FusedDecodeStep
from qmamba.kernels.decode_linear import DecodePolicy
from qmamba.kernels.persistent import PersistentChain, UnsupportedLaunch, recording

__all__ = ["PersistentDecodeStep", "UnsupportedLaunch", "make_decode_step"]


@dataclasses.dataclass
class _Recorded:
    ids: torch.Tensor
    chain: PersistentChain
    logits: torch.Tensor
    zeroed: torch.Tensor | None = None  # the workspace split-K launches accumulate into: zeroed before each run


class PersistentDecodeStep:
    """``step(token_ids [B], state) -> logits [B, V]`` fp32, state updated in place, as :class:`FusedDecodeStep`;
    see the module docstring. ``programs``: the persistent grid (default: ``policy.persistent_programs``, or what is
    resident at once on CUDA, one program on CPU). The returned logits are the step's buffer, overwritten by the
    next call."""

    max_recorded = 4  # chains kept (each a small table on the device); the oldest goes first

    def __init__(self, model, policy: DecodePolicy | None = None, programs: int | None = None):
        self.policy = policy or DecodePolicy.for_device(model.device)
        self.fused = FusedDecodeStep(model, dataclasses.replace(self.policy, pdl=False))
        self.model = model
        self.device = model.device
        self.programs = programs or self.policy.persistent_programs or None
        self.fallback_batches: set[int] = set()
        self._fallback: FusedDecodeStep | None = None
        self._recorded: OrderedDict[tuple, _Recorded] = OrderedDict()

    def record(self, token_ids: torch.Tensor, state):
        """The launches of one fused step on ``state`` (nothing runs): ``(launches, ids buffer, logits buffer,
        workspace to zero before each run or None)``; :class:`UnsupportedLaunch` where the step cannot be replayed."""
        ids = torch.zeros_like(token_ids, memory_format=torch.contiguous_format)
        buf = self.fused._workspace(token_ids.shape[0], token_ids.device)  # (allocated and zeroed outside)
        zero, buf["zero"] = buf["zero"], False  # the per-step zeroing of split-K outputs: done by __call__
        try:
            with recording() as launches:
                logits = self.fused(ids, state)
        finally:
            buf["zero"] = zero
        return launches, ids, logits, buf["ws"] if zero else None

    def _record(self, token_ids: torch.Tensor, state) -> _Recorded:
        launches, ids, logits, zeroed = self.record(token_ids, state)
        prefetch = None if self.policy.persistent_prefetch else False
        chain = PersistentChain(launches, self.device, programs=self.programs, num_warps=self.fused.policy.num_warps,
                                prefetch=prefetch, maxnreg=self.policy.persistent_maxnreg)
        return _Recorded(ids, chain, logits, zeroed)

    def __call__(self, token_ids: torch.Tensor, state) -> torch.Tensor:
        batch = token_ids.shape[0]
        if batch in self.fallback_batches:
            return self._fallback(token_ids, state)
        key = (batch, token_ids.dtype, state.conv_state.data_ptr(), state.ssm_state.data_ptr())
        entry = self._recorded.get(key)
        first = entry is None
        if first:
            try:
                entry = self._record(token_ids, state)
            except UnsupportedLaunch:
                self.fallback_batches.add(batch)
                if self._fallback is None:
                    self._fallback = FusedDecodeStep(self.model, self.policy)
                return self._fallback(token_ids, state)
            self._recorded[key] = entry
            while len(self._recorded) > self.max_recorded:
                self._recorded.popitem(last=False)
        self._recorded.move_to_end(key)
        entry.ids.copy_(token_ids)
        if entry.zeroed is not None:
            entry.zeroed.zero_()
        entry.chain()
        if first and self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing() and \
                entry.chain.timed_out():  # a new chain's first run is checked (one host synchronisation)
            self._recorded.pop(key)
            raise RuntimeError(f"the persistent decode step's {entry.chain.programs} programs were not all resident "
                               "at once (its barriers timed out, its results are wrong): set "
                               "DecodePolicy.persistent_programs lower, or run without DecodePolicy.persistent")
        return entry.logits


def make_decode_step(model, policy: DecodePolicy | None = None):
    """The decode step a policy asks for: :class:`FusedDecodeStep`, or with ``policy.persistent`` its launches as
    one persistent launch (:class:`PersistentDecodeStep`)."""
    policy = policy or DecodePolicy.for_device(model.device)
    return PersistentDecodeStep(model, policy) if policy.persistent else FusedDecodeStep(model, policy)
