"""Evaluation on the runtime side: sliding-window perplexity, LAMBADA last-word accuracy, router agreement.

Perplexity (HF-style sliding window): windows of ``seq_len`` tokens start every ``stride`` tokens; each window
scores only the tokens not scored by an earlier window, so every token after the first is scored exactly once,
with at least ``seq_len - stride`` tokens of context (except at the start). ``stride == seq_len`` gives
non-overlapping windows.

LAMBADA: context and continuation are tokenized separately and concatenated (lm-evaluation-harness convention);
a record counts as correct when every continuation token is the greedy argmax. Also reported: the
continuation's perplexity.

Router agreement: the fraction of tokens whose top-1 expert is the same in two models (each MoE layer fed by its
own model's preceding layers), on the same token ids, overall and per MoE layer. ``compare_checkpoints`` records
the routing in the perplexity forwards, at the positions they score. The decision recorded is the one each MoE
block takes on its backend (``SwitchMoE.route``), Triton's fused MoE included.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qmamba.errors import UserError


def _windows(n_tokens: int, seq_len: int, stride: int):
    """``(begin, end, n_scored)`` for each window."""
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + seq_len, n_tokens)
        yield begin, end, end - max(prev_end, begin + 1)  # a window's first token has no context in it
        prev_end = end
        if end >= n_tokens:
            return
        begin += stride


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None, batch_size: int = 8,
               progress: bool = True, routes: dict | None = None) -> dict:
    """Sliding-window perplexity of a 1-D token tensor; returns ``{"ppl", "nll", "tokens", ...}``.

    ``routes``: a dict to fill with ``{MoE layer: top-1 expert idx [tokens] int16}`` at the positions whose logits
    are scored (each position of the text but the last once, in order; the padding of a short window left out),
    recorded during the same forwards (:func:`routing_hooks`)."""
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not (0 < stride <= seq_len):
        raise UserError(f"need seq_len >= 2 and 0 < stride <= seq_len, got seq_len={seq_len} stride={stride}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise UserError(f"evaluation text has {ids.numel()} tokens: at least 2 are needed")
    device = model.device
    windows = list(_windows(ids.numel(), seq_len, stride))
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", disable=not progress, leave=False)
    with routing_hooks(model) if routes is not None else contextlib.nullcontext({}) as records:
        scored_routes: dict[int, list] = {i: [] for i in records}
        for j in range(0, len(windows), batch_size):
            group = windows[j: j + batch_size]
            width = max(end - begin for begin, end, _ in group)
            batch = torch.zeros(len(group), width, dtype=torch.long)
            for row, (begin, end, _) in enumerate(group):
                batch[row, : end - begin] = ids[begin:end]
            logits = model(batch.to(device)).float()
            layer_idx = {i: _one_forward(v, i).reshape(len(group), width) for i, v in records.items()}
            for row, (begin, end, n_scored) in enumerate(group):
                length = end - begin
                lp = F.log_softmax(logits[row, : length - 1], dim=-1)
                target = batch[row, 1:length].to(device)
                nll = -lp.gather(-1, target[:, None])[:, 0]
                total_nll += float(nll[length - 1 - n_scored:].sum())
                total_tokens += n_scored
                for i, idx in layer_idx.items():  # the positions whose predictions were scored
                    scored_routes[i].append(idx[row, length - 1 - n_scored: length - 1])
            bar.update(len(group))
    bar.close()
    if routes is not None:
        routes.update({i: torch.cat(v) for i, v in scored_routes.items()})
        _check_routes(routes, total_tokens)
    nll = total_nll / total_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tokens, "seq_len": seq_len, "stride": stride}


def load_lambada(path, limit: int | None = None) -> list[dict]:
    """LAMBADA records of a ``.jsonl.gz`` file; ``limit``: only the first N (None: all)."""
    _check_limit("LAMBADA record limit (--lambada-limit)", limit)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, EOFError) as exc:
        raise UserError(f"cannot read LAMBADA file {path}: {exc}") from None
    return records if limit is None else records[:limit]


@torch.no_grad()
def lambada(model, tokenizer, records: list[dict], progress: bool = True) -> dict:
    """Greedy last-word accuracy and continuation perplexity over LAMBADA records (``tokenizer.encode(text)`` ->
    list of ids, as :class:`qmamba.tokenizer.TextTokenizer`)."""
    correct, nll_sum, n_tokens = 0, 0.0, 0
    for rec in tqdm(records, desc="lambada", disable=not progress, leave=False):
        ctx = tokenizer.encode(rec["context"])
        cont = tokenizer.encode(rec["continuation"])
        if not ctx or not cont:
            continue
        ids = torch.tensor([ctx + cont], dtype=torch.long, device=model.device)
        logits = model(ids)[0, len(ctx) - 1: -1].float()
        target = ids[0, len(ctx):]
        correct += bool((logits.argmax(-1) == target).all())
        nll_sum += float(-F.log_softmax(logits, -1).gather(-1, target[:, None]).sum())
        n_tokens += len(cont)
    n = len(records)
    return {"accuracy": correct / n if n else float("nan"), "records": n,
            "continuation_ppl": math.exp(nll_sum / n_tokens) if n_tokens else float("nan")}


@contextlib.contextmanager
def routing_hooks(model):
    """Inside the block, every forward of ``model`` appends to ``{MoE layer index: [idx [B * L] int16 (CPU), ...]}``
    (yielded) the top-1 expert of each token.

    A pre-hook on each MoE block asks the block for its routing of the block's input (``SwitchMoE.route``: on
    every backend the decision its forward takes; the Triton forward routes inside its fused kernels and never
    calls the router module, so a hook on the router would see nothing there)."""
    records: dict[int, list] = {}
    handles = []
    for block in model.blocks:
        if block.is_mamba:
            continue
        i = block.index
        records[i] = []

        def hook(mixer, args, i=i):
            x = args[0]
            idx, _ = mixer.route(x.reshape(-1, x.shape[-1]))
            records[i].append(idx.reshape(-1).to(torch.int16).cpu())

        handles.append(block.mixer.register_forward_pre_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _one_forward(recorded: list, layer: int) -> torch.Tensor:
    """The routing one forward recorded at ``layer`` (emptying the list)."""
    if len(recorded) != 1:
        raise RuntimeError(f"MoE layer {layer} recorded its routing {len(recorded)} times in one forward instead of "
                           "once: this model's MoE forward bypasses SwitchMoE.forward")
    return recorded.pop()


def _check_routes(routes: dict, n_tokens: int) -> None:
    wrong = {i: v.numel() for i, v in routes.items() if v.numel() != n_tokens}
    if wrong:
        raise RuntimeError(f"routing recorded for {wrong} (layer: decisions) instead of {n_tokens} tokens per MoE "
                           "layer: this model's MoE forward bypasses SwitchMoE.forward")


@torch.no_grad()
def record_routing(model, ids: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Top-1 expert of every token at every MoE layer: ``{layer index: idx [N * L] int16}``, for ``ids [N, L]``
    (see :func:`routing_hooks`). Raises if a MoE layer recorded other than one decision per token."""
    with routing_hooks(model) as records:
        for chunk in ids.split(batch_size):
            model(chunk.to(model.device))
    routes = {i: torch.cat(v) if v else torch.empty(0, dtype=torch.int16) for i, v in records.items()}
    _check_routes(routes, ids.numel())
    return routes


def routing_agreement(routes_a: dict, routes_b: dict) -> dict:
    """``{"overall": fraction, "per_layer": {layer: fraction}}`` of equal top-1 choices (``{layer: idx}`` each,
    the same layers and tokens)."""
    if set(routes_a) != set(routes_b) or any(routes_a[i].shape != routes_b[i].shape for i in routes_a):
        raise ValueError(f"routings of different layers or tokens: {({i: tuple(v.shape) for i, v in routes_a.items()})}"
                         f" vs {({i: tuple(v.shape) for i, v in routes_b.items()})}")
    per_layer = {i: int((routes_a[i] == routes_b[i]).sum()) / routes_a[i].numel() if routes_a[i].numel()
                 else float("nan") for i in routes_a}
    total = sum(routes_a[i].numel() for i in routes_a)
    same = sum(int((routes_a[i] == routes_b[i]).sum()) for i in routes_a)
    return {"overall": same / total if total else float("nan"), "per_layer": per_layer}


def router_agreement(model_a, model_b, ids: torch.Tensor, batch_size: int = 8) -> dict:
    """Top-1 routing agreement of two models on ``ids [N, L]`` (``tokens``: N * L, per layer)."""
    return {**routing_agreement(record_routing(model_a, ids, batch_size), record_routing(model_b, ids, batch_size)),
            "tokens": int(ids.numel())}


def text_windows(ids: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to ``max_windows`` consecutive windows ``[n, seq_len]`` from 1-D ids (for router agreement)."""
    n = min(max_windows, ids.numel() // seq_len)
    if n == 0:
        raise UserError(f"text has {ids.numel()} tokens: fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


# ---- checkpoints -------------------------------------------------------------------------------------------
def _check_limit(what: str, limit) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UserError(f"{what} must be a positive integer (or None for all), got {limit!r}")


def encode_text_spec(tokenizer, spec: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[N]`` of a text spec (see :mod:`qmamba.data_files`), the first ``max_tokens`` when given
    (None: all)."""
    return _encode_counted(tokenizer, spec, max_tokens)[0]


def _encode_counted(tokenizer, spec: str, max_tokens: int | None) -> tuple[torch.Tensor, int]:
    """``(ids, number of tokens in the whole text)``."""
    from qmamba.data_files import load_text_spec

    _check_limit("token limit (--max-tokens)", max_tokens)
    text = load_text_spec(spec)
    if not text.strip():
        raise UserError(f"evaluation text {spec} is empty")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return (ids if max_tokens is None else ids[:max_tokens]), ids.numel()


def evaluate_model(model, tokenizer, data: str | None = "corpus:heldout", do_lambada: bool = False,
                   seq_len: int = 512, stride: int | None = None, max_tokens: int | None = None,
                   lambada_limit: int | None = None, batch_size: int = 8, progress: bool = True,
                   routes: dict | None = None) -> dict:
    """Perplexity on a text spec and/or LAMBADA for a loaded model (``routes``: see :func:`perplexity`)."""
    from qmamba.data_files import lambada_path

    result: dict = {}
    if data:
        ids, text_tokens = _encode_counted(tokenizer, data, max_tokens)
        if int(ids.max()) >= model.config.vocab_size:
            raise UserError(f"{data}: token id {int(ids.max())} is outside the model's vocabulary "
                            f"({model.config.vocab_size}); wrong tokenizer?")
        result["perplexity"] = {"data": data, "text_tokens": text_tokens, "max_tokens": max_tokens,
                                **perplexity(model, ids, seq_len, stride, batch_size, progress, routes)}
    if do_lambada:
        result["lambada"] = lambada(model, tokenizer, load_lambada(lambada_path(), lambada_limit), progress)
    return result


def evaluate_checkpoint(path, tokenizer_path=None, device=None, dtype=None, backend=None, int8_activations=None,
                        **kwargs) -> dict:
    """Load the checkpoint at ``path`` (``int8_activations``: as :func:`qmamba.load_model`) and
    :func:`evaluate_model` it; adds ``path``, the file size and whether the prefill ran on int8 activations."""
    from pathlib import Path

    from qmamba import load_model
    from qmamba.tokenizer import resolve_tokenizer

    from qmamba.checkpoints.detect import resolve_checkpoint_dir

    tokenizer = resolve_tokenizer(resolve_checkpoint_dir(path), tokenizer_path)  # before the weights: fail fast
    model = load_model(path, device=device, dtype=dtype, backend=backend, int8_activations=int8_activations)
    result = {"path": str(path), "int8_activations": model.int8_prefill,
              **evaluate_model(model, tokenizer, **kwargs)}
    p = Path(path)
    if p.is_dir():
        result["bytes_on_disk"] = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return result


def compare_checkpoints(path_a, path_b, tokenizer_path=None, device=None, dtype=None, backend=None,
                        data: str | None = "corpus:heldout", int8_activations=None, **kwargs) -> dict:
    """Evaluate two checkpoints on the same data; deltas (B - A) and top-1 router agreement of B with A (MoE
    models of one configuration, with ``data``: on the positions the perplexity scores, recorded in its forwards).

    Both are scored with the same tokenizer: ``tokenizer_path`` when given, else each checkpoint's own, which must
    then be the same tokenizer (otherwise the perplexities count different tokens: a :class:`UserError`)."""
    from qmamba import load_model
    from qmamba.tokenizer import resolve_tokenizer

    from qmamba.checkpoints.detect import resolve_checkpoint_dir

    # each checkpoint's own tokenizer (or the one given), before the weights
    tokenizers = [resolve_tokenizer(resolve_checkpoint_dir(p), tokenizer_path) for p in (path_a, path_b)]
    if tokenizer_path is None and tokenizers[0].tokenizer.to_str() != tokenizers[1].tokenizer.to_str():
        raise UserError(f"A and B have different tokenizers ({tokenizers[0].path} vs {tokenizers[1].path}): their "
                        "perplexities count different tokens and cannot be compared; evaluate each alone, or pass "
                        "--tokenizer FILE to score both with one")
    tokenizer = tokenizers[0]
    models = [load_model(p, device=device, dtype=dtype, backend=backend, int8_activations=int8_activations)
              for p in (path_a, path_b)]
    want_routes = bool(data) and bool(models[0].config.moe_layer_ids) and models[0].config == models[1].config
    routes = [{} if want_routes else None for _ in models]
    results = [{"path": str(p), "int8_activations": m.int8_prefill,
                **evaluate_model(m, tokenizer, data=data, routes=r, **kwargs)}
               for p, m, r in zip((path_a, path_b), models, routes)]
    out = {"a": results[0], "b": results[1], "delta": {}}
    if "perplexity" in results[0]:
        pa, pb = results[0]["perplexity"]["ppl"], results[1]["perplexity"]["ppl"]
        out["delta"]["ppl"] = pb - pa
        out["delta"]["ppl_relative"] = pb / pa - 1
    if "lambada" in results[0]:
        out["delta"]["lambada_accuracy"] = results[1]["lambada"]["accuracy"] - results[0]["lambada"]["accuracy"]
    if want_routes:
        out["router_agreement"] = {**routing_agreement(*routes), "tokens": results[0]["perplexity"]["tokens"]}
    return out
