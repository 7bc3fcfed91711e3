"""Autoregressive generation: prefill the prompt in parallel, then one token per step from the recurrent state.

Small pure pieces, so the decode step can be swapped (a CUDA-graph replay, an ONNX session)::

    logits, state = prefill(model, input_ids)                 # [B, L] -> last-position logits [B, V], state
    logits = decode_one_token(step_fn, token_ids, state)      # [B] -> [B, V]; state updated in place
    next_ids = sample(logits, temperature, top_k, top_p, generator)
    tokens = generate(model, input_ids, max_new_tokens, ...)  # [B, L + T]
    stats = stream_generate(model, tokenizer, prompt, max_new_tokens, ...)  # text to a stream (the CLI)

All sequences of a batch share one prompt length (an SSM has no attention mask: padding would enter the state).
Sampling stays on the model's device; the loop reads nothing back to the host except every ``sync_every`` steps
to see whether all sequences have finished (and whatever a ``stream`` callback reads).
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable

import torch

from qmamba.errors import UserError

StepFn = Callable[[torch.Tensor, object], torch.Tensor]


class GenerationError(UserError, ValueError):
    """Bad generation options (negative temperature, top-p outside (0, 1], ...)."""


def check_sampling_options(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits ``[B, V]`` (float) with everything outside the top-k and the top-p nucleus set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p`` (at least one).
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` (int64, on the logits' device) from ``logits [B, V]``.

    ``temperature == 0``: greedy (argmax). Otherwise softmax(logits / temperature) restricted by top-k/top-p,
    drawn with ``generator`` (a ``torch.Generator`` on the logits' device) for reproducible runs.
    """
    check_sampling_options(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def prefill(model, input_ids: torch.Tensor):
    """Run the prompt ``[B, L]`` in parallel; returns ``(logits of the last position [B, V], state)``."""
    if "last_only" in inspect.signature(model.prefill).parameters:  # skip the head over the whole prompt
        logits, state = model.prefill(input_ids, last_only=True)
    else:
        logits, state = model.prefill(input_ids)
    return logits[:, -1], state


def decode_one_token(step_fn: StepFn, token_ids: torch.Tensor, state) -> torch.Tensor:
    """One decode step: ``token_ids [B]`` -> logits ``[B, V]``; ``state`` is advanced in place."""
    return step_fn(token_ids, state)


def eager_step_fn(model) -> StepFn:
    """The model's own step (no token-range check: sampled ids are in range by construction)."""
    return lambda token_ids, state: model.step(token_ids, state, check=False)


def make_generator(device, seed: int | None) -> torch.Generator | None:
    """A seeded generator on ``device`` (``None`` when ``seed`` is None: torch's global RNG is used)."""
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


@torch.no_grad()  # not inference_mode: the returned tokens must be usable in autograd code
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, step_fn: StepFn | None = None,
             sync_every: int = 8) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids [B, L]``; returns ``[B, L + T]`` (T <= max_new_tokens).

    A sequence that samples ``eos_token_id`` keeps that token and is padded with ``pad_token_id`` (default: the
    EOS id) afterwards; generation ends early once every sequence has finished. ``stream(token_ids [B])`` is
    called after each step with the new tokens (device tensor; pads for finished sequences). ``step_fn(token_ids
    [B], state) -> logits [B, V]`` replaces the eager ``model.step`` (e.g. a CUDA-graph replay); the state comes
    from ``step_fn.prefill`` when it has one (so a graph decoder can hand out its static state), else from
    ``model.prefill``. ``generator`` (or ``seed``) makes sampling reproducible.

    ``model`` needs ``.device`` and ``.prefill(input_ids) -> (logits [B, L, V], state)``, plus ``.step`` unless a
    ``step_fn`` is given (a :class:`MambaLM`, or any runner with that interface).
    """
    check_sampling_options(temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be [batch, length >= 1], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.device
    input_ids = input_ids.to(device)
    if max_new_tokens == 0:
        return input_ids.clone()
    if hasattr(model, "check_token_ids"):
        model.check_token_ids(input_ids)
    if generator is None:
        generator = make_generator(device, seed)
    step_fn = step_fn or eager_step_fn(model)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    logits, state = prefill(step_fn if hasattr(step_fn, "prefill") else model, input_ids)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            if pad is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
            finished = finished | (token == eos_token_id)
        new_tokens.append(token)
        if stream is not None:
            stream(token)
        last = i + 1 == max_new_tokens
        if eos_token_id is not None and (stream is not None or (i + 1) % sync_every == 0 or last):
            if bool(finished.all()):
                break
        if not last:
            logits = decode_one_token(step_fn, token, state)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def stream_generate(model, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int | None = None, step_fn: StepFn | None = None,
                    label: str | None = None, out=None, err=None) -> dict:
    """Continue ``prompt`` and stream the text to ``out`` as it comes (the prompt first), then one timing line to
    ``err`` (``label`` names the backend there); returns the figures (``prompt_tokens``, ``new_tokens``,
    ``prefill_s``, ``decode_s``, ``tokens_per_s``, and the generated ``text``). An empty prompt starts a new document (the end-of-text token).

    ``model``: what :func:`generate` runs (a :class:`qmamba.model.MambaLM`, or a runner with ``.device``,
    ``.prefill``, ``.step`` and ``.check_token_ids``, such as the onnxruntime one); ``tokenizer``: a
    :class:`qmamba.tokenizer.TextTokenizer`; ``step_fn``: as in :func:`generate`.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_token_id is None:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eos_token_id]
    input_ids = torch.tensor([ids], dtype=torch.int64, device=model.device)
    model.check_token_ids(input_ids)
    decoder = tokenizer.stream_decoder()
    timing = {"first": None, "count": 0}
    pieces = []
    out.write(prompt)
    out.flush()

    def stream(token):
        token_id = int(token[0])
        if timing["first"] is None:
            timing["first"] = time.perf_counter()
        timing["count"] += 1
        if token_id == tokenizer.eos_token_id:
            return
        piece = decoder.push([token_id])
        if piece:
            pieces.append(piece)
            out.write(piece)
            out.flush()

    start = time.perf_counter()
    generate(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             eos_token_id=tokenizer.eos_token_id, stream=stream, step_fn=step_fn)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    end = time.perf_counter()
    pieces.append(decoder.flush())
    out.write(pieces[-1] + "\n")
    out.flush()
    stats = {**timing_stats(len(ids), timing["count"], start, timing["first"], end), "text": "".join(pieces)}
    err.write(timing_line(stats, f" ({label})" if label else "") + "\n")
    return stats


def generated_lengths(tokens: torch.Tensor, prompt_len: int, eos_token_id: int | None) -> torch.Tensor:
    """Number of generated tokens per sequence up to and including its first EOS: ``[B]``."""
    new = tokens[:, prompt_len:]
    if eos_token_id is None or new.shape[1] == 0:
        return torch.full((tokens.shape[0],), new.shape[1], dtype=torch.int64)
    is_eos = (new == eos_token_id).cpu()
    first_eos = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first_eos, torch.full_like(first_eos, new.shape[1])).to(torch.int64)


def timing_stats(prompt_tokens: int, new_tokens: int, start: float, first: float | None, end: float) -> dict:
    """Timing figures of one generation: ``first`` is when the first new token was ready (None: no token)."""
    first = end if first is None else first
    decode_s = end - first
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_s": first - start,
            "decode_s": decode_s,
            "tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None}


def timing_line(stats: dict, where: str = "") -> str:
    """One line for stderr: ``64 tokens in 1.20 s: prefill 5 tokens + first token 30 ms, decode 55.0 tokens/s``."""
    if stats["new_tokens"] == 0:
        return f"no tokens generated (prompt {stats['prompt_tokens']} tokens; --max-new-tokens 0)"
    line = (f"{stats['new_tokens']} tokens in {stats['prefill_s'] + stats['decode_s']:.2f} s{where}: prefill "
            f"{stats['prompt_tokens']} tokens + first token {stats['prefill_s'] * 1e3:.0f} ms")
    if stats["tokens_per_s"] is not None:
        line += f", decode {stats['tokens_per_s']:.1f} tokens/s"
    return line
