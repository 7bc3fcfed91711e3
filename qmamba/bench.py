"""``qmamba bench``'s library side: prefill and decode speed of a loaded model, checked before it is reported.

For each batch size: a seeded random prompt (no tokenizer needed) is prefilled (the head on the last position, as
generation runs it), then

1. **check**: ``check_tokens`` greedy steps through the path that will be timed (the CUDA-graph fused step on CUDA
   with the Triton backend, ``model.step`` otherwise) are compared, teacher-forced on the same tokens, with the
   pure-PyTorch reference path (on CUDA: the eager reference backend; on CPU, where the timed path *is* the
   reference step: the prefill over prompt + tokens, an independent forward). Every position's top-1 token must
   agree, except where the reference's own top two logits are within ``tie_tolerance`` of its logit range
   (a rounding-level tie, counted and reported). A fused step that runs the MoE's fc1 (and fc2) on int8 codes
   (``DecodePolicy.int8_rows``, ``int8_rows_fc2``) is checked against the reference twin that rounds its inputs the same way; where a
   value at a code's rounding boundary went the other way in the two paths, its picks are checked again against
   the twin fed the step's own codes (:func:`same_codes_reference`). Anything else raises
   :class:`BenchCheckError`: no figure is reported for an unchecked path. The prefill that starts it is checked too
   (:func:`check_prefill_reference`): where the model's backend is not the reference one (Triton on CUDA), its
   last-position top-1 tokens and final SSM state against the reference backend's prefill of the same prompt.
2. **time**: prefill tokens/s (median of repeats) and decode ms/token over ``tokens`` greedy tokens (the graph
   decoder's on-device loop on CUDA, one host sync; the eager loop elsewhere).

Figures: prefill tokens/s, decode ms/token and tokens/s (all rows), peak memory (CUDA: ``max_memory_allocated``;
CPU: not measured), weight bytes, device name.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from qmamba.devices import foreign_gpu_bytes, format_bytes


class BenchCheckError(RuntimeError):
    """The timed path's tokens differ from the reference path's: the benchmark refuses to report a figure."""


@dataclass
class BenchRow:
    device: str
    dtype: str
    weights: str
    weight_gb: float
    batch: int
    prompt_len: int
    tokens: int
    prefill_tok_s: float
    decode_ms_per_token: float
    decode_tok_s: float
    peak_gb: float | None
    path: str
    check: str
    prefill_path: str = "eager"

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_formats(model) -> str:
    """A short description of the stored weight formats, e.g. ``int4 g128 + float``."""
    names = []
    for m in model.modules():
        fmt = getattr(m, "fmt", None)
        if fmt is not None:
            d = fmt.describe() if hasattr(fmt, "describe") else str(getattr(fmt, "name", fmt))
            if d not in names:
                names.append(d)
    return " + ".join(names) if names else str(model.compute_dtype).replace("torch.", "")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step_fn(model):
    """``(step_fn, name)``: what ``qmamba generate`` decodes with on this model."""
    from qmamba.cuda_graph import default_step_fn

    fn = default_step_fn(model)
    if fn is None:
        return (lambda ids, state: model.step(ids, state, check=False)), f"eager {_backend(model)}"
    fused = type(getattr(fn, "_step", None)).__name__ == "FusedDecodeStep"
    return fn, "cuda graph (fused step)" if fused else "cuda graph (model.step)"


def _backend(model) -> str:
    backends = {m.backend for m in model.modules() if m is not model and hasattr(m, "backend")}
    return ",".join(sorted(backends)) or "reference"


@contextlib.contextmanager
def _reference_backend(model, policy=None):
    """Every module of ``model`` on the pure-PyTorch reference backend inside the block, as it was after it; a model
    whose MoE runs on int8 activations (``model.int8_activations``) gets the reference twin of that (expert
    inputs rounded as the W4A8 kernels round them: ``QuantExperts.int8_inputs`` for the prefill, and in a batched
    step ``int8_step_fc1`` / ``int8_step_fc2`` where the fused step runs fc1 / fc2 on the W4A8 row programs,
    ``DecodePolicy.int8_rows`` / ``int8_rows_fc2`` of ``policy``, default the device's)."""
    saved = {m: m.backend for m in model.modules() if m is not model and hasattr(m, "backend")}
    rounding = {m: (m.int8_inputs, m.int8_step_fc1, m.int8_step_fc2) for m in model.modules()
                if hasattr(m, "int8_inputs")}
    on = bool(getattr(model, "int8_activations", False))
    fc1 = fc2 = False
    if on and rounding:
        if policy is None:
            from qmamba.kernels.decode_policy import DecodePolicy  # lazily: the Triton path's policy

            policy = DecodePolicy.for_device(model.device)
        fc1 = bool(policy.int8_rows)
        fc2 = fc1 and bool(policy.int8_rows_fc2)
    model.set_backend("reference")
    for m in rounding:
        m.int8_inputs, m.int8_step_fc1, m.int8_step_fc2 = on, fc1, fc2
    try:
        yield model
    finally:
        for m, b in saved.items():
            m.backend = b
        for m, flags in rounding.items():
            m.int8_inputs, m.int8_step_fc1, m.int8_step_fc2 = flags


def _reference_logits(model, prompt, fed, state, policy=None):
    """Reference logits ``[B, T, V]`` fp32 after feeding ``fed [B, T]`` one by one from ``state`` (the state after
    ``prompt``): on CUDA the eager reference backend's steps (``policy``: see :func:`_reference_backend`), on CPU
    one prefill over ``prompt + fed``."""
    if model.device.type == "cuda":
        with _reference_backend(model, policy):
            st = state.clone()
            return torch.stack([model.step(fed[:, t], st, check=False).float() for t in range(fed.shape[1])], 1)
    logits, _ = model.prefill(torch.cat([prompt, fed], 1), check=False)
    return logits[:, prompt.shape[1]:].float()


def _top1_gap(ref, got_top):
    """``(ref_top, gap)``: the reference's top-1 token and, where ``got_top`` differs from it, how far the reference
    prefers its own pick, as a fraction of its logit range (``ref [..., V]`` fp32, ``got_top [...]``)."""
    ref_top = ref.argmax(-1)
    span = (ref.amax(-1) - ref.amin(-1)).clamp_min(1e-6)
    gap = (ref.gather(-1, ref_top[..., None]) - ref.gather(-1, got_top[..., None]))[..., 0] / span
    return ref_top, gap


def count_ties(ref, picks, tie_tolerance: float = 2e-3) -> int | None:
    """How many of ``picks [B, T]`` differ from the top-1 of ``ref [B, T, V]`` where its own top two are within
    ``tie_tolerance`` of its logit range (rounding-level ties), or None where one differs by more."""
    ref_top, gap = _top1_gap(ref, picks)
    mismatch = ref_top != picks
    return None if (mismatch & (gap > tie_tolerance)).any() else int(mismatch.sum())


def _fused_step(step_fn):
    """The step behind ``step_fn``: a graph decoder's (its ``_step``), or ``step_fn`` itself."""
    return getattr(step_fn, "_step", step_fn)


def int8_rows_step(step_fn, batch: int):
    """The :class:`qmamba.fused_step.FusedDecodeStep` behind ``step_fn`` (itself, or a graph decoder's) where it runs
    fc1 on int8 codes at ``batch`` rows (``DecodePolicy.int8_rows``), else None."""
    step = _fused_step(step_fn)
    layers = getattr(step, "int8_rows_layers", None)
    return step if layers is not None and layers(batch) else None


def same_codes_reference(model, fed, state, inputs, policy) -> torch.Tensor:
    """The reference twin's logits ``[B, T, V]`` fp32 fed ``fed [B, T]`` one step at a time from a copy of ``state``,
    its experts multiplying ``inputs`` (per step, per MoE layer in the model's order: ``(fc1's input, fc2's input or
    None)``, each ``[B, K]``, a fused step's int8 codes dequantized, :func:`recording_int8_inputs`) instead of
    rounding their own (``policy``: the fused step's, which says which of them it rounds). A value at a code's .5
    boundary can round the other way in two paths that differ in their last bits, and on a model with random
    weights that code's worth can move a top-1; with the codes given, what is compared is the arithmetic after the
    rounding."""
    from qmamba.quant.modules import QuantExperts

    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    if len(inputs) != fed.shape[1] or any(len(step) != len(experts) for step in inputs):
        raise ValueError(f"same_codes_reference: inputs of {[len(s) for s in inputs]} MoE layers for "
                         f"{fed.shape[1]} steps of {len(experts)} MoE layers")
    fc2 = bool(policy.int8_rows_fc2)
    if any((layer[1] is not None) != fc2 for step in inputs for layer in step):
        raise ValueError("same_codes_reference: fc2's inputs recorded where the policy runs fc2 on floats, or none "
                         "where it runs it on int8 codes")
    with _reference_backend(model, policy):
        for i, m in enumerate(experts):
            m.int8_step_fc1_inputs = [step[i][0] for step in inputs]
            m.int8_step_fc2_inputs = [step[i][1] for step in inputs] if fc2 else None
        try:
            st = state.clone()
            ref = torch.stack([model.step(fed[:, t], st, check=False).float() for t in range(fed.shape[1])], 1)
            left = [m for m in experts if m.int8_step_fc1_inputs or m.int8_step_fc2_inputs]
            if left:
                raise RuntimeError(f"same_codes_reference: {len(left)} MoE layers did not take their inputs")
        finally:
            for m in experts:
                m.int8_step_fc1_inputs = m.int8_step_fc2_inputs = None
    return ref


@contextlib.contextmanager
def recording_int8_inputs(step, batch: int):
    """``step`` (a :class:`qmamba.fused_step.FusedDecodeStep`, or None: nothing recorded) records the int8 inputs of
    its experts inside the block; yields a callable that returns the latest step's at ``batch`` rows, dequantized
    (per MoE layer that runs them, fc1's input ``[batch, d]`` and fc2's, or None where fc2 runs on floats). A graph
    captured inside the block records them too (device copies of the codes, which its replays rewrite in place;
    nothing in the capture reads the host)."""
    if step is None:
        yield None
        return
    n_moe = step.int8_rows_layers(batch)
    step.int8_inputs_log = []

    from qmamba.kernels.w4a8_gemm import dequantize_rows_int8

    def latest():
        if len(step.int8_inputs_log) < n_moe:
            raise RuntimeError("recording_int8_inputs: the step recorded no int8 inputs (a graph captured before?)")
        return [tuple(None if rec is None else dequantize_rows_int8(*rec) for rec in layer)
                for layer in step.int8_inputs_log[-n_moe:]]

    try:
        yield latest
    finally:
        step.int8_inputs_log = None


def check_decode(model, step_fn, prompt, state, n: int, tie_tolerance: float = 2e-3) -> str:
    """Teacher-forced greedy agreement of ``step_fn`` with the reference (see the module docstring). ``state`` is
    the state after ``prompt``; the first token fed is the prompt's last (both paths see the same tokens).

    Where ``step_fn`` is a fused step (or a graph decoder of one not yet captured at this batch size) that runs fc1
    on int8 codes (:func:`int8_rows_step`), the codes it multiplied are recorded; if its picks fail against the
    reference twin that rounds its own x, they are checked again against the twin fed those codes
    (:func:`same_codes_reference`): the timed path's own picks must pass that, ties allowed as always."""
    batch = prompt.shape[0]
    fed, got, codes = [], [], []
    st = state.clone()
    tok = prompt[:, -1]
    with recording_int8_inputs(int8_rows_step(step_fn, batch), batch) as latest:
        for _ in range(n):
            fed.append(tok)
            tok = step_fn(tok, st).float().argmax(-1)
            got.append(tok)
            if latest is not None:
                codes.append(latest())
    fed, got_top = torch.stack(fed, 1), torch.stack(got, 1)
    policy = getattr(_fused_step(step_fn), "policy", None)  # a fused step's: how it runs the MoE
    ref = _reference_logits(model, prompt, fed, state, policy)
    ref_top, gap = _top1_gap(ref, got_top)
    mismatch = ref_top != got_top
    rows = f"{n} tokens x {batch} rows"
    if not mismatch.any():
        return f"ok ({rows})"
    bad = mismatch & (gap > tie_tolerance)
    if bad.any():
        b, t = [int(v) for v in bad.nonzero()[0]]
        failed = (f"decode check failed: at step {t} of row {b} the timed path picks token {int(got_top[b, t])} and "
                  f"the reference {int(ref_top[b, t])} (gap {float(gap[b, t]):.2e} of the logit range)")
        if not codes:
            raise BenchCheckError(failed + "; no figure reported")
        ties = count_ties(same_codes_reference(model, fed, state, codes, policy), got_top, tie_tolerance)
        if ties is None:
            raise BenchCheckError(failed + ", also against the reference fed the step's own int8 codes; no figure "
                                           "reported")
        return f"ok ({rows}, on the step's own int8 codes, {ties} rounding-level ties)"
    return f"ok ({rows}, {int(mismatch.sum())} rounding-level ties)"


def _compare_prefills(got, state, ref, ref_state, what: str, against: str, tie_tolerance: float) -> str:
    """Last-position top-1 tokens per row (ties as in :func:`check_decode`) and final SSM states (within 2% of the
    reference's largest entry) of two prefills; raises :class:`BenchCheckError` where they part."""
    got_top = got[:, -1].float().argmax(-1)
    ref_top, gap = _top1_gap(ref[:, -1].float(), got_top)
    bad = (ref_top != got_top) & (gap > tie_tolerance)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise BenchCheckError(f"prefill check failed: in row {b} the {what}'s next token is {int(got_top[b])} and "
                              f"the {against}'s {int(ref_top[b])}; no figure reported")
    err = float((state.ssm_state.float() - ref_state.ssm_state.float()).abs().max())
    scale = float(ref_state.ssm_state.float().abs().max()) or 1.0
    if not err <= 0.02 * scale:
        raise BenchCheckError(f"prefill check failed: the {what}'s final state is off by {err:.3g} (largest entry "
                              f"{scale:.3g} in the {against}'s); no figure reported")
    return f"ok ({got.shape[0]} rows, state error {err / scale:.1e})"


def check_prefill_reference(model, prompt, tie_tolerance: float = 2e-3, timed=None) -> str:
    """The eager prefill as timed (the model's backend; ``timed``: its ``(logits, state)`` of ``prompt`` if already
    computed) against the reference backend's prefill of the same prompt (see :func:`_compare_prefills`). A model
    already on the reference backend (CPU) is its own reference: nothing to compare, and the check says so."""
    if _backend(model) == "reference":
        return "reference path"
    got, state = timed if timed is not None else model.prefill(prompt, check=False, last_only=True)
    with _reference_backend(model):
        ref, ref_state = model.prefill(prompt, check=False, last_only=True)
    return _compare_prefills(got, state, ref, ref_state, f"{_backend(model)} prefill", "reference prefill",
                             tie_tolerance)


def check_prefill(model, graph_prefill, prompt, tie_tolerance: float = 2e-3) -> str:
    """The graph prefill against the eager prefill (see :func:`_compare_prefills`)."""
    ref, ref_state = model.prefill(prompt, check=False, last_only=True)
    got, state = graph_prefill.prefill(prompt)
    return _compare_prefills(got, state, ref, ref_state, "graph prefill", "eager prefill", tie_tolerance)


def time_prefill(model, ids, repeats: int, graph_prefill=None) -> float:
    """Prefill tokens/s (median of ``repeats``): ``model.prefill`` or, given, a :class:`GraphPrefill`'s."""
    def run():
        if graph_prefill is not None:
            graph_prefill.prefill(ids)
        else:
            model.prefill(ids, check=False, last_only=True)

    run()
    _sync(model.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(model.device)
        times.append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times)


def time_decode(model, step_fn, state, first, tokens: int) -> float:
    """ms per token of ``tokens`` greedy steps (graph decoder: its on-device generation loop)."""
    if hasattr(step_fn, "generate"):
        step_fn.generate(first, state.clone(), tokens)  # capture (per token count) + warm-up
        _sync(model.device)
        t0 = time.perf_counter()
        step_fn.generate(first, state, tokens)
        _sync(model.device)
        return (time.perf_counter() - t0) * 1e3 / tokens
    st = state.clone()
    tok = first
    step_fn(tok, st)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = step_fn(tok, st).argmax(-1)
    _sync(model.device)
    return (time.perf_counter() - t0) * 1e3 / tokens


@torch.no_grad()
def bench_model(model, batches=(1,), prompt_len: int = 2048, tokens: int = 256, check_tokens: int = 8,
                seed: int = 0, log=None, check_model=None, prefill_graph: bool = False) -> list[BenchRow]:
    """One :class:`BenchRow` per batch size (see the module docstring); raises :class:`BenchCheckError` when the
    timed path's tokens differ from the reference's.

    ``prefill_graph`` (CUDA, Triton backend): time the prefill as CUDA-graph chunks
    (:class:`qmamba.graph_prefill.GraphPrefill`), first checked against the eager prefill (:func:`check_prefill`).

    ``check_model``: a callable returning a float32 twin of ``model`` (same weights) on which the check runs
    instead: a bf16 step differs from a bf16 reference by rounding that can reach a top-1 margin on a model with
    random weights, so the kernels are checked where rounding is small (the twin is dropped before timing).
    """
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shared = foreign_gpu_bytes(device)
    if shared:
        message = (f"{format_bytes(shared)} of {device}'s memory is held by other processes: if they are running "
                   "kernels, the times below are slowed by their share of the GPU")
        if log:
            log(f"warning: {message}")
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    prompts = {}
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        prompts[batch] = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    checks = {}
    checked = check_model() if check_model is not None else model
    check_fn, _ = _timed_step_fn(checked)
    for batch in batches:
        if check_tokens > 0:
            logits, state = checked.prefill(prompts[batch], check=False, last_only=True)
            prefill_check = check_prefill_reference(checked, prompts[batch], timed=(logits, state.clone()))
            checks[batch] = check_decode(checked, check_fn, prompts[batch], state, check_tokens)
            checks[batch] += "" if checked is model else f", checked in {str(checked.compute_dtype)[6:]}"
            checks[batch] += f"; prefill {prefill_check}"
        else:
            checks[batch] = "not checked"
        if log:
            log(f"batch {batch}: check {checks[batch]}")
    del checked, check_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_fn, path = _timed_step_fn(model)
    graph_prefill = None
    if prefill_graph:
        from qmamba.graph_prefill import GraphPrefill

        graph_prefill = GraphPrefill(model)
    rows = []
    for batch in batches:
        prompt = prompts[batch]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, state = model.prefill(prompt, check=False, last_only=True)
        if graph_prefill is not None:
            checked_prefill = check_prefill(model, graph_prefill, prompt)
            checks[batch] += f"; prefill graph {checked_prefill}"
            if log:
                log(f"batch {batch}: prefill graph check {checked_prefill}")
        prefill = time_prefill(model, prompt, repeats=3 if device.type == "cuda" else 1, graph_prefill=graph_prefill)
        ms = time_decode(model, step_fn, state, prompt[:, -1], tokens)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        rows.append(BenchRow(name, str(model.compute_dtype).replace("torch.", ""), weight_formats(model),
                             weight_bytes(model) / 1e9, batch, prompt_len, tokens, prefill, ms, batch * 1e3 / ms,
                             peak, path, checks[batch], "cuda graph chunks" if graph_prefill else "eager"))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    head = ("device", "weights", "batch", "prompt", "prefill tok/s", "decode ms/tok", "decode tok/s", "peak GB",
            "weights GB", "check")
    lines = [head]
    for r in rows:
        lines.append((r.device, r.weights, str(r.batch), str(r.prompt_len), f"{r.prefill_tok_s:,.0f}",
                      f"{r.decode_ms_per_token:.3f}", f"{r.decode_tok_s:,.1f}",
                      "-" if r.peak_gb is None else f"{r.peak_gb:.2f}", f"{r.weight_gb:.2f}", r.check.split(" (")[0]))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
