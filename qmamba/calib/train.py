"""Plain next-token training of a :class:`MambaLM` in pure PyTorch (CPU or CUDA), with a Switch-style
load-balancing loss for the MoE routers.

Library::

    train_loop(model, batches, loss_fn, *, steps, lr, ...) -> list[dict]     # reusable (also for distillation)
    next_token_loss(aux_coef)                                                 # loss_fn for language modelling
    evaluate(model, windows) -> {"loss", "ppl", "routing": {layer: [fraction per expert]}}

Load balancing: the forward routes each token to ``argmax(sigmoid(router(h)))`` and scales the expert's output by
that probability (differentiable through the probability, not the choice). The auxiliary loss is Switch
Transformer's ``E * sum_e f_e * P_e`` per MoE layer, with ``f_e`` the fraction of tokens sent to expert e (no
gradient) and ``P_e`` the mean of ``softmax(router logits)`` (differentiable; same argmax as the sigmoid). It is 1
when routing is uniform and reaches E when one expert takes every token. Router logits are captured with forward
hooks, so the model code is unchanged.

Command line (also trains the tokenizer; see ``qmamba/assets/tiny-blackmamba/README.md``)::

    python -m qmamba.calib.train --preset tiny-blackmamba-fixture --data full:train --train-tokenizer 4096 \
        --steps 3000 --seq-len 128 --batch 16 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qmamba.config import ModelConfig, preset
from qmamba.errors import UserError
from qmamba.model import MambaLM

from .train_scan import fast_training_scan

NO_DECAY_SUFFIXES = ("A_log", "D", "dt_bias", "conv_weight", "conv_bias", "bias", "norm.weight", "norm_f.weight")


# ---- model set-up --------------------------------------------------------------------------------------------------
def init_model(cfg: ModelConfig, seed: int = 0, device=None) -> MambaLM:
    """A float32 :class:`MambaLM` with Mamba's initialisation (see :mod:`qmamba.checkpoints.random_init`)."""
    from qmamba.checkpoints.random_init import random_state_dict

    model = MambaLM(cfg)
    missing, unexpected = model.load_state_dict(random_state_dict(cfg, seed=seed), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"initialisation does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.to(device) if device is not None else model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on projection/expert/router/embedding matrices only."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied head: once
            continue
        seen.add(id(p))
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- router capture and load balancing -----------------------------------------------------------------------------
@contextlib.contextmanager
def capture_router_logits(model: torch.nn.Module):
    """Yields a dict ``{moe_module_name: [router logits [T, E], ...]}`` filled during forwards inside the block."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for block in model.blocks:
        if not block.is_mamba:
            captured[block.mixer_name] = []
            handles.append(block.mixer.router.register_forward_hook(
                lambda _m, _inp, out, key=block.mixer_name: captured[key].append(out)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def load_balancing_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Switch loss ``E * sum_e f_e * P_e`` for one layer's router logits ``[T, E]`` (1 = uniform)."""
    n_experts = router_logits.shape[-1]
    logits = router_logits.float().reshape(-1, n_experts)
    chosen = logits.argmax(dim=-1)
    fraction = torch.bincount(chosen, minlength=n_experts).float() / max(1, chosen.numel())
    prob = torch.softmax(logits, dim=-1).mean(dim=0)
    return n_experts * (fraction.detach() * prob).sum()


def routing_fractions(router_logits: list[torch.Tensor]) -> list[float]:
    """Fraction of tokens sent to each expert, over all captured calls of one layer."""
    logits = torch.cat([t.detach().float().reshape(-1, t.shape[-1]) for t in router_logits])
    counts = torch.bincount(logits.argmax(dim=-1), minlength=logits.shape[-1]).double()
    return (counts / counts.sum()).tolist()


# ---- losses --------------------------------------------------------------------------------------------------------
def next_token_loss(aux_coef: float = 0.01) -> Callable:
    """``loss_fn(model, (inputs [B, L], targets [B, L])) -> (loss, metrics)``: cross-entropy + ``aux_coef`` x mean
    load-balancing loss over the MoE layers."""

    def loss_fn(model, batch):
        inputs, targets = batch
        with capture_router_logits(model) as captured:
            logits = model(inputs)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux_terms = [load_balancing_loss(torch.cat(v)) for v in captured.values() if v]
        aux = torch.stack(aux_terms).mean() if aux_terms else ce.new_zeros(())
        return ce + aux_coef * aux, {"ce": float(ce.detach()), "aux": float(aux.detach())}

    return loss_fn


# ---- the loop ------------------------------------------------------------------------------------------------------
def train_loop(model: torch.nn.Module, batches: Iterable, loss_fn: Callable, *, steps: int, lr: float = 3e-3,
               warmup: int = 100, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, betas=(0.9, 0.95),
               grad_clip: float = 1.0, params: list | None = None, autocast_dtype: torch.dtype | None = None,
               log_every: int = 50, progress: bool = True, on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``steps`` AdamW steps of ``loss_fn(model, batch)`` over ``batches`` (an iterable of batches already on
    the model's device) with a cosine schedule and gradient clipping. ``params``: parameter groups (default
    :func:`parameter_groups`; pass a subset for distillation). ``autocast_dtype``: e.g. ``torch.bfloat16`` on CUDA.
    Returns the logged records ``{"step", "lr", "loss", ...metrics}`` (averaged over ``log_every`` steps)."""
    device = next(model.parameters()).device
    groups = params if params is not None else parameter_groups(model, weight_decay)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)
    model.train()
    history, window, it = [], [], iter(batches)
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup, min_lr_ratio)
        batch = next(it)
        autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss, metrics = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
        optimizer.step()
        window.append({"loss": float(loss.detach()), "grad_norm": float(grad_norm), **metrics})
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"]}
            record.update({k: sum(w[k] for w in window) / len(window) for k in window[0]})
            history.append(record)
            window = []
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if on_log is not None:
                on_log(record)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: MambaLM, windows: torch.Tensor, batch: int = 8) -> dict:
    """Mean next-token loss and perplexity over ``windows [W, L + 1]`` (each scored from a fresh state), plus the
    routing fraction of every MoE layer."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with capture_router_logits(model) as captured:
        for i in range(0, windows.shape[0], batch):
            w = windows[i:i + batch].to(device)
            logits = model(w[:, :-1]).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += w[:, 1:].numel()
        routing = {name: routing_fractions(v) for name, v in captured.items() if v}
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "routing": routing}


# ---- command line --------------------------------------------------------------------------------------------------
def _build_config(args) -> ModelConfig:
    if args.config:
        try:
            data = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read model config {args.config}: {exc}") from None
        return ModelConfig.from_dict(data)
    return preset(args.preset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qmamba.calib.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-blackmamba-fixture")
    p.add_argument("--config", help="model config JSON (ModelConfig fields); overrides --preset")
    p.add_argument("--data", action="append",
                   help="training text spec (full:train[/name], corpus:train[/name] or a file); repeatable")
    p.add_argument("--eval-data", default="corpus:heldout", help="held-out text for the final report")
    p.add_argument("--tokenizer", help="existing tokenizer.json (else --train-tokenizer VOCAB)")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--eval-windows", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    return p.parse_args(argv)


def train_from_args(args: argparse.Namespace, work: Path, argv: list[str]) -> dict:
    """Tokenizer (trained into ``work`` or given), data, training, evaluation, checkpoint; returns the report."""
    from qmamba.calib.text_data import (EOS_TOKEN, RandomWindows, consecutive_windows, token_stream,
                                        train_bpe_tokenizer, training_text_files, unigram_cross_entropy)
    from qmamba.checkpoints.native import save_checkpoint
    from qmamba.data_files import resolve_text_spec

    out = Path(args.out)
    if out.exists():
        raise UserError(f"output directory {out} already exists")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    files = training_text_files(args.data or ["full:train"])
    if args.tokenizer:
        from qmamba.tokenizer import load_tokenizer

        tokenizer_file = Path(args.tokenizer)
        tokenizer = load_tokenizer(tokenizer_file).tokenizer  # a clear error when missing or unreadable
    elif args.train_tokenizer:
        tokenizer_file = work / "tokenizer.json"
        print(f"training a {args.train_tokenizer}-token byte-level BPE on {len(files)} files", file=sys.stderr)
        tokenizer = train_bpe_tokenizer(files, args.train_tokenizer, tokenizer_file)
    else:
        raise UserError("give --tokenizer FILE or --train-tokenizer VOCAB")
    cfg = _build_config(args)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the model's vocab_size is "
                        f"{cfg.vocab_size}")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    train_ids = token_stream(tokenizer, files, eos_id)
    eval_files = list(resolve_text_spec(args.eval_data))
    eval_ids = token_stream(tokenizer, eval_files, eos_id)
    print(f"train tokens {train_ids.numel():,}, held-out tokens {eval_ids.numel():,}", file=sys.stderr)

    model = init_model(cfg, seed=args.seed, device=device)
    batches = RandomWindows(train_ids, args.batch, args.seq_len, seed=args.seed, device=device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    start = time.time()
    with fast_training_scan(model):
        history = train_loop(model, batches, next_token_loss(args.aux_coef), steps=args.steps, lr=args.lr,
                             warmup=args.warmup, weight_decay=args.weight_decay, autocast_dtype=autocast,
                             log_every=args.log_every)
    seconds = time.time() - start
    save_dtype = getattr(torch, args.save_dtype)
    # evaluate the weights as they will be stored
    stored = MambaLM(cfg)
    stored.load_state_dict({k: v.detach().to(save_dtype).float() for k, v in model.state_dict().items()})
    stored.to(device)
    windows = consecutive_windows(eval_ids, args.seq_len, args.eval_windows)
    result = evaluate(stored, windows)
    unigram = unigram_cross_entropy(train_ids, windows[:, 1:].reshape(-1), cfg.vocab_size)
    report = {
        "train_command": "python -m qmamba.calib.train " + " ".join(argv),
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "train_files": [f.name for f in files], "train_tokens": int(train_ids.numel()),
        "tokens_seen": args.steps * args.batch * args.seq_len, "train_seconds": round(seconds, 1),
        "device": str(device), "final_train_loss": history[-1]["ce"] if history else None,
        "heldout": {"spec": args.eval_data, "windows": int(windows.shape[0]), "tokens": result["tokens"],
                    "loss": result["loss"], "ppl": result["ppl"], "unigram_ppl": math.exp(unigram)},
        "routing_fractions": result["routing"],
        "loss_curve": [[r["step"], round(r["ce"], 4), round(r["aux"], 4)] for r in history],
    }
    save_checkpoint(model, cfg, out, tokenizer_file=tokenizer_file, dtype=save_dtype,
                    extra={"training": report})
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="qmamba-train-") as work:
            report = train_from_args(args, Path(work), argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
