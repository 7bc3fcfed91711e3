"""CUDA-graph prefill: a prompt cut into power-of-two chunks, each chunk one replay of a captured ``model.prefill``.

An eager prefill of BlackMamba-2.8B over 2048 tokens launches ~250 kernels from Python, and on the H200 its wall
time is well above its kernel time (session 16, `benchmarks/profile_prefill.py`: bf16 28.9 ms wall for 11.0 ms of
kernels, int4 38.4 for 20.7). A captured graph replays all of them with one host call.

Graphs need fixed shapes, so :class:`GraphPrefill` captures one graph per (batch size, chunk length, head) and feeds
a prompt of any length as a sequence of chunks (:func:`chunk_plan`: the largest power of two that fits, from
``max_chunk`` down to ``min_chunk``), the SSM and conv state carried from chunk to chunk in one static state per
batch size (Mamba's prefill takes an initial state, so chunked == whole up to rounding). What is left below
``min_chunk`` runs as an eager prefill from the carried state. All graphs share one memory pool (they never run
concurrently), so the graphs of several chunk lengths cost about one prefill's activations.

``capture=False`` runs the same chunk loop eagerly (any device): the chunking itself is tested on CPU; the capture
needs CUDA and the Triton backend (the reference backend's MoE synchronises with the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.state import InferenceState


def chunk_plan(length: int, max_chunk: int, min_chunk: int) -> tuple[list[int], int]:
    """``(chunks, tail)``: power-of-two chunk lengths between ``min_chunk`` and ``max_chunk`` (both powers of two),
    largest first, covering ``length`` but for a ``tail < min_chunk`` tokens."""
    if min_chunk < 1 or max_chunk < min_chunk or max_chunk & (max_chunk - 1) or min_chunk & (min_chunk - 1):
        raise ValueError(f"chunk lengths must be powers of two with 1 <= min_chunk <= max_chunk, got "
                         f"{min_chunk} and {max_chunk}")
    chunks, left, c = [], length, max_chunk
    while c >= min_chunk:
        while left >= c:
            chunks.append(c)
            left -= c
        c //= 2
    return chunks, left


@dataclass
class _Chunk:
    graph: "torch.cuda.CUDAGraph | None"
    ids: torch.Tensor
    logits: torch.Tensor | None


class GraphPrefill:
    """``prefill(input_ids [B, L], state=None, last_only=True) -> (logits, state)`` as ``model.prefill`` (see the
    module docstring); the state returned is new tensors."""

    def __init__(self, model, max_chunk: int = 2048, min_chunk: int = 16, capture: bool = True, warmup: int = 2):
        chunk_plan(0, max_chunk, min_chunk)  # validates the chunk lengths
        if capture:
            if model.device.type != "cuda":
                raise ValueError("GraphPrefill(capture=True) needs the model on a CUDA device")
            backends = {m.backend for m in model.modules() if m is not model and hasattr(m, "backend")}
            if backends != {"triton"}:
                raise ValueError("GraphPrefill(capture=True) needs the Triton backend (the reference MoE "
                                 "synchronises with the host, which a graph cannot capture)")
        self.model = model
        self.max_chunk, self.min_chunk = max_chunk, min_chunk
        self.capture, self.warmup = capture, warmup
        self._states: dict[int, InferenceState] = {}
        self._chunks: dict[tuple, _Chunk] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    # ---- one chunk -------------------------------------------------------------------------------------------------
    def _state(self, batch: int) -> InferenceState:
        if batch not in self._states:
            self._states[batch] = self.model.new_state(batch)
        return self._states[batch]

    def _body(self, ids: torch.Tensor, state: InferenceState, last_only: bool) -> torch.Tensor:
        """The captured work: a prefill of ``ids`` from ``state``, its final state written back into ``state``."""
        logits, new = self.model._prefill(ids, state, last_only)
        state.conv_state.copy_(new.conv_state)
        state.ssm_state.copy_(new.ssm_state)
        return logits

    def _chunk(self, batch: int, length: int, last_only: bool) -> _Chunk:
        key = (batch, length, last_only)
        if key in self._chunks:
            return self._chunks[key]
        device = self.model.device
        ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        if not self.capture:
            entry = _Chunk(None, ids, None)
        else:
            state = self._state(batch)
            saved = state.clone()  # the warm-up runs overwrite the carried state
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(self.warmup):  # compiles the Triton kernels, settles allocations
                    self._body(ids, state, last_only)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
                logits = self._body(ids, state, last_only)
            state.conv_state.copy_(saved.conv_state)
            state.ssm_state.copy_(saved.ssm_state)
            entry = _Chunk(graph, ids, logits)
        self._chunks[key] = entry
        return entry

    # ---- the prefill -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, state: InferenceState | None = None, last_only: bool = True):
        """Chunked prefill (see the module docstring): ``(logits [B, 1, V] or [B, L, V], new state)``."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"prefill: input_ids must be [B, L] with L >= 1, got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        chunks, tail = chunk_plan(length, self.max_chunk, self.min_chunk)
        entries = [self._chunk(batch, c, last_only) for c in chunks]  # every capture before the state is set
        carried = self._state(batch)
        if state is None:
            carried.conv_state.zero_()
            carried.ssm_state.zero_()
        else:
            carried.conv_state.copy_(state.conv_state)
            carried.ssm_state.copy_(state.ssm_state)
        pieces, pos = [], 0
        for entry, c in zip(entries, chunks):
            entry.ids.copy_(input_ids[:, pos:pos + c])
            if entry.graph is not None:
                entry.graph.replay()
                logits = entry.logits
            else:
                logits = self._body(entry.ids, carried, last_only)
            if not last_only:
                pieces.append(logits.clone())
            pos += c
        if tail:
            logits = self._body(input_ids[:, pos:], carried, last_only)
            if not last_only:
                pieces.append(logits)
        logits = torch.cat(pieces, 1) if not last_only else logits.clone()  # never a graph's static output
        return logits, carried.clone()
