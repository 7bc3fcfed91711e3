"""CUDA-graph decode: the whole single-token step captured once per batch size, then replayed.

:class:`GraphDecoder` is a drop-in ``step_fn(token_ids [B], state) -> logits [B, V]`` (as ``model.step``, the state
is updated in place). The captured step is :class:`qmamba.fused_step.FusedDecodeStep` (Triton kernels,
no allocation, no host sync) or, with ``fused=False``, ``model.step`` itself on the model's current backend.
Each batch size gets its own graph over static buffers (token ids, the flat state tensors, logits); a call whose
state tensors are not those buffers copies the state in and out around the replay, so any ``InferenceState``
works, and :meth:`GraphDecoder.new_state` / :meth:`GraphDecoder.prefill` hand out the static state itself to skip
the copies.

:meth:`GraphDecoder.generate` also captures sampling (greedy or temperature/top-k through the Gumbel-max trick) in
the graph: each replay writes the next token into a device buffer and feeds it back as the next input, so a whole
continuation runs with one host synchronisation at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.state import InferenceState


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    ids: torch.Tensor
    state: InferenceState
    logits: torch.Tensor
    tokens: torch.Tensor | None = None   # generate(): [B, capacity] sampled ids
    counter: torch.Tensor | None = None  # generate(): next column to write


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0) -> torch.Tensor:
    """Next token ids ``[B]`` (int64) on the device without a host sync: greedy when ``temperature == 0``, otherwise
    Gumbel-max sampling from ``softmax(logits / temperature)`` restricted to the ``top_k`` best (0 = all)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    u = torch.rand_like(scaled).clamp_(min=1e-20, max=1.0 - 1e-7)
    return (scaled - torch.log(-torch.log(u))).argmax(dim=-1)


class GraphDecoder:
    """Graph-captured single-token decode for a model on a CUDA device (see the module docstring)."""

    def __init__(self, model, fused: bool = True, warmup: int = 2, policy=None):
        """``policy``: the :class:`qmamba.kernels.decode_linear.DecodePolicy` of the fused step (default: the
        device's)."""
        if model.device.type != "cuda":
            raise ValueError("GraphDecoder needs the model on a CUDA device")
        self.model = model
        self.warmup = warmup
        if fused:
            from qmamba.fused_step import FusedDecodeStep

            self._step = FusedDecodeStep(model, policy)
        else:
            self._step = lambda ids, state: model.step(ids, state, check=False)
        self._graphs: dict = {}

    # ---- capture -------------------------------------------------------------------------------------------------
    def _capture(self, batch: int, sampling=None, capacity: int = 0) -> _Captured:
        device = self.model.device
        ids = torch.zeros(batch, dtype=torch.long, device=device)
        state = self.model.new_state(batch)
        tokens = counter = None
        if sampling is not None:
            tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device)
            counter = torch.zeros(1, dtype=torch.long, device=device)

        def body():
            logits = self._step(ids, state)
            if sampling is not None:
                nxt = sample_next(logits, *sampling)
                tokens.scatter_(1, counter.expand(batch, 1), nxt[:, None])
                counter.add_(1)
                ids.copy_(nxt)
            return logits

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):  # compiles the Triton kernels, settles allocations
                body()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            logits = body()
        state.conv_state.zero_()
        state.ssm_state.zero_()
        return _Captured(graph, ids, state, logits, tokens, counter)

    def _entry(self, batch: int) -> _Captured:
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch)
        return self._graphs[batch]

    # ---- the step_fn -----------------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> InferenceState:
        """The static state of batch size ``batch`` (zeroed): steps on it replay without copies."""
        entry = self._entry(batch)
        entry.state.conv_state.zero_()
        entry.state.ssm_state.zero_()
        return entry.state

    def prefill(self, input_ids: torch.Tensor, last_only: bool = False):
        """``model.prefill`` whose final state is copied into the static state: ``(logits, static state)``."""
        logits, state = self.model.prefill(input_ids, last_only=last_only)
        entry = self._entry(input_ids.shape[0])
        entry.state.conv_state.copy_(state.conv_state)
        entry.state.ssm_state.copy_(state.ssm_state)
        return logits, entry.state

    def _replay(self, entry: _Captured, state: InferenceState):
        static = state.ssm_state.data_ptr() == entry.state.ssm_state.data_ptr() and \
            state.conv_state.data_ptr() == entry.state.conv_state.data_ptr()
        if not static:
            entry.state.conv_state.copy_(state.conv_state)
            entry.state.ssm_state.copy_(state.ssm_state)
        entry.graph.replay()
        if not static:
            state.conv_state.copy_(entry.state.conv_state)
            state.ssm_state.copy_(entry.state.ssm_state)

    def __call__(self, token_ids: torch.Tensor, state: InferenceState) -> torch.Tensor:
        """``token_ids [B]`` -> logits ``[B, V]`` (float32, a fresh tensor); ``state`` updated in place."""
        entry = self._entry(token_ids.shape[0])
        entry.ids.copy_(token_ids)
        self._replay(entry, state)
        return entry.logits.clone()

    # ---- whole continuations ---------------------------------------------------------------------------------------
    def generate(self, first_ids: torch.Tensor, state: InferenceState, n_tokens: int, temperature: float = 0.0,
                 top_k: int = 0) -> torch.Tensor:
        """Feed ``first_ids [B]`` and sample ``n_tokens`` more on the GPU: ``[B, n_tokens]`` int64 (one host sync).

        Token ``i`` is sampled from the logits after token ``i - 1`` (``first_ids`` for ``i = 0``); ``state`` ends
        after the last fed token (the final sample is returned, not fed).
        """
        batch = first_ids.shape[0]
        key = ("generate", batch, float(temperature), int(top_k), int(n_tokens))
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, (float(temperature), int(top_k)), n_tokens)
        entry = self._graphs[key]
        entry.ids.copy_(first_ids)
        entry.counter.zero_()
        static = state.ssm_state.data_ptr() == entry.state.ssm_state.data_ptr()
        if not static:
            entry.state.conv_state.copy_(state.conv_state)
            entry.state.ssm_state.copy_(state.ssm_state)
        for _ in range(n_tokens):
            entry.graph.replay()
        if not static:
            state.conv_state.copy_(entry.state.conv_state)
            state.ssm_state.copy_(entry.state.ssm_state)
        return entry.tokens.clone()


def default_step_fn(model):
    """The step function ``qmamba generate`` uses: a :class:`GraphDecoder` when the model is on CUDA and runs the
    Triton backend (the fused step, or the captured ``model.step`` where a module has no fused kernel); ``None``
    (the caller's eager ``model.step``) otherwise."""
    if model.device.type != "cuda":
        return None
    backends = {m.backend for m in model.modules() if m is not model and hasattr(m, "backend")}
    if backends != {"triton"}:
        return None
    try:
        return GraphDecoder(model)
    except (TypeError, ValueError):  # a module or format without a fused kernel
        return GraphDecoder(model, fused=False)
