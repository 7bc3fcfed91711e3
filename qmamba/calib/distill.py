"""Distillation of a 1-bit (``binary``) student against its full-precision teacher (Bi-Mamba's autoregressive
distillation, short and post-training).

The student is the quantized model (``BinaryLinear`` / ``BinaryExperts`` modules from PTB; other modules may be
int4/int8 or float). For the duration of training every binary weight becomes a :class:`TrainableBinaryWeight`:
``alpha``, ``beta`` (and ``row_scale``) are float32 parameters; the signs are either fixed (the PTB signs) or, with
``ste=True``, ``sign(U)`` of a latent ``U`` initialised from the teacher's weights (``U = (W / r - beta) / alpha``,
so ``sign(U)`` equals the PTB signs) and trained through a straight-through estimator (identity gradient).
Optionally the norms (``train_norms``) and the remaining high-precision parameters (``train_float``: conv, dt bias,
A_log, D, float projections, routers; never the embedding/tied head) train too.

Optionally (``block_steps``) each block is first trained on its own to reproduce the teacher's residual stream
after it (:mod:`qmamba.calib.block_match`), then the KL stage below runs on the whole model.

Loss: the KL divergence from the teacher's next-token distribution to the student's, per token, averaged (the same
gradient as Bi-Mamba's soft cross-entropy; temperature ``T`` divides both logits). AdamW without weight decay,
linear warm-up then cosine decay, gradient clipping; batches are random rows of the calibration ids. A step budget
and/or a wall-clock budget stop training; a tqdm bar shows the loss. With a checkpoint directory the trainable
tensors, optimizer and step are saved every ``checkpoint_every`` steps (atomically) and a later run resumes there.

At the end :func:`distill` writes the result back: the trainable weights are rounded to their stored fp16 form and
packed again, so the student holds ``BinaryLinear``/``BinaryExperts`` modules as before (ready to save).

Memory (:func:`qmamba.calib.chunked_kl.student_teacher_kl`): by default the student's blocks run under activation
checkpointing (``checkpoint_blocks``: one fp32 residual per block kept, each block recomputed in the backward) and
the final norm + head + KL run in checkpointed chunks of ``loss_chunk_rows`` token positions (no full-vocabulary
logits of the whole batch); the teacher runs under ``torch.no_grad()``. Same loss and gradients up to float
rounding; about a third more compute per step (the student's forward runs twice).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qmamba.checkpoints.files import one_line
from qmamba.errors import ConfigError, UserError
from qmamba.moe import StackedExperts, expert_mlp
from qmamba.quant import layout
from qmamba.quant.binary import BinaryFormat, BinaryLinear, is_binary
from qmamba.quant.modules import PackedExpertWeight, QuantExperts, set_submodule

from .block_match import match_blocks
from .chunked_kl import kl_sum, student_teacher_kl
from .train import cosine_lr
from .train_scan import fast_training_scan

CHECKPOINT_FILE = "distill_state.pt"
TEACHER_DTYPES = ("float32", "bfloat16")
NEVER_TRAINED = ("embedding.weight", "lm_head.weight")


@dataclass
class DistillOptions:
    steps: int = 200                  # optimizer steps (upper bound)
    time_budget: float | None = None  # seconds of training (upper bound); None = steps only
    lr: float = 1e-3
    latent_lr: float | None = None    # STE latent signs (default: lr)
    warmup: int = 10
    min_lr_ratio: float = 0.1
    batch_size: int = 8
    temperature: float = 1.0
    grad_clip: float = 1.0
    ste: bool = False                 # update the signs through a straight-through estimator
    train_norms: bool = False         # also train the RMSNorm weights (and the final norm)
    train_float: bool = False         # also train the other high-precision parameters (not the embedding)
    block_steps: int = 0              # block-output matching steps per block before the KL (block_match.py)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    seed: int = 0
    progress: bool = True
    checkpoint_blocks: bool = True    # recompute each student block in the backward instead of keeping its activations
    loss_chunk_rows: int | None = 1024  # token positions per checkpointed head + KL chunk; None = the batch at once
    teacher_dtype: str = "float32"    # the teacher's float parameters: float32, or bfloat16 (half the memory)

    def __post_init__(self):
        def check(name, ok, want):
            value = getattr(self, name)
            if isinstance(value, bool) or not ok(value):
                raise ConfigError(f"distillation option {name} must be {want}, got {value!r}")

        def number(v):
            return isinstance(v, (int, float)) and math.isfinite(v)

        check("steps", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (--distill-steps)")
        check("batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (--distill-batch)")
        check("block_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (--distill-block-steps)")
        check("checkpoint_every", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        check("loss_chunk_rows", lambda v: v is None or (isinstance(v, int) and v >= 1), "None or an integer >= 1")
        check("teacher_dtype", lambda v: v in TEACHER_DTYPES, f"one of {', '.join(TEACHER_DTYPES)} "
              "(--distill-teacher-dtype)")
        check("warmup", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        check("lr", lambda v: number(v) and v > 0, "a number > 0 (--distill-lr)")
        check("time_budget", lambda v: v is None or (number(v) and v >= 0),
              "a number of seconds >= 0 (--distill-time)")
        check("latent_lr", lambda v: v is None or (number(v) and v > 0), "a number > 0")
        check("temperature", lambda v: number(v) and v > 0, "a number > 0")
        check("grad_clip", lambda v: number(v) and v > 0, "a number > 0")
        check("min_lr_ratio", lambda v: number(v) and 0 <= v <= 1, "a number in [0, 1]")


class DistillationError(UserError):
    """Distillation that cannot go on: a diverging loss, or a checkpoint made for other data."""


# ---- trainable stand-ins -------------------------------------------------------------------------------------
class TrainableBinaryWeight(nn.Module):
    """One binary matrix ``[N, K]`` or stack ``[E, N, K]`` with trainable parameters; :meth:`weight` is W_hat."""

    def __init__(self, fmt: BinaryFormat, packed: dict, k: int, latent_init: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.k = fmt, k
        self.alpha = nn.Parameter(packed["alpha"].float().clone())
        self.beta = nn.Parameter(packed["beta"].float().clone())
        self.row_scale = nn.Parameter(packed["row_scale"].float().clone()) if fmt.row_scale else None
        if latent_init is not None:  # STE: keep the stored signs, magnitudes from the teacher
            pm1 = layout.signs_pm1(packed["qweight"], k)
            self.latent = nn.Parameter(pm1 * latent_init.float().abs().clamp(min=1e-3))
            self.register_buffer("fixed_signs", None)
        else:  # fixed signs stay packed, 8 a byte (BlackMamba-2.8B: 0.33 GB instead of 2.6 as int8), unpacked per use
            self.latent = None
            self.register_buffer("fixed_signs", packed["qweight"].detach().clone())

    def signs(self) -> torch.Tensor:
        if self.latent is None:
            return layout.signs_pm1(self.fixed_signs, self.k)
        hard = torch.where(self.latent >= 0, 1.0, -1.0)
        return self.latent + (hard - self.latent).detach()  # straight-through: d hard / d latent := 1

    def weight(self) -> torch.Tensor:
        W = self.signs() * self.alpha[..., None, :] + self.beta[..., None, :]
        return W if self.row_scale is None else W * self.row_scale[..., :, None]

    @torch.no_grad()
    def packed(self) -> dict:
        """The stored form (fp16 parameters, packed signs); ``alpha`` stays >= 0 by flipping signs if needed."""
        S = self.signs().detach()
        alpha = self.alpha.detach()
        S = torch.where(alpha[..., None, :] < 0, -S, S)
        ab = torch.stack([alpha.abs(), self.beta.detach()], dim=-2)
        r = None if self.row_scale is None else self.row_scale.detach()
        return self.fmt.from_codes((S >= 0).to(torch.uint8), ab, r)


class _TrainableLinear(nn.Module):
    def __init__(self, src: BinaryLinear, latent_init: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.w = TrainableBinaryWeight(src.fmt, src.packed(), src.in_features, latent_init)
        self.bias = src.bias
        self.initial_qweight = src.qweight  # for the sign-flip statistic

    def forward(self, x):
        return F.linear(x, self.w.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_module(self) -> BinaryLinear:
        mod = BinaryLinear(self.in_features, self.out_features, self.w.fmt, self.bias is not None,
                           device=self.w.alpha.device, bias_dtype=self.bias.dtype if self.bias is not None
                           else torch.float32)
        mod.load_packed(self.w.packed())
        if self.bias is not None:
            mod.bias = self.bias
        return mod


class _TrainableExperts(nn.Module):
    """Stand-in for a :class:`QuantExperts`: binary matrices train, other formats stay frozen (dequantized)."""

    def __init__(self, src: QuantExperts, latents: dict):
        super().__init__()
        self.src = src
        self.n_experts, self.gated, self.activation = src.n_experts, src.gated, src.activation
        self.parts = nn.ModuleDict()
        self.frozen: dict[str, torch.Tensor] = {}
        for name in ("fc1", "fc2"):
            w = getattr(src, name)
            if isinstance(w, PackedExpertWeight) and is_binary(w.fmt):
                self.parts[name] = TrainableBinaryWeight(w.fmt, w.packed(), w.k, latents.get(name))
            elif isinstance(w, PackedExpertWeight):
                self.frozen[name] = w.dequantized(None, torch.float32)
            else:
                self.frozen[name] = w  # float Parameter (trainable only with train_float)

    def _stack(self, name: str) -> torch.Tensor:
        return self.parts[name].weight() if name in self.parts else self.frozen[name]

    def forward(self, x, expert_idx):
        fc1, fc2 = self._stack("fc1"), self._stack("fc2")
        out = x.new_zeros(x.shape[0], fc2.shape[1])
        for e in range(self.n_experts):
            rows = (expert_idx == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_put((rows,), expert_mlp(x[rows], fc1[e].to(x.dtype), fc2[e].to(x.dtype),
                                                        self.activation, self.gated))
        return out

    def to_module(self) -> QuantExperts:
        src = self.src
        for name, part in self.parts.items():
            getattr(src, name).load_packed(part.packed())
        return src


def _teacher_weight(teacher: nn.Module, name: str) -> torch.Tensor:
    """Float weight of module ``name`` in the teacher (``nn.Linear`` weight or stacked experts ``fc1``/``fc2``)."""
    parent, _, leaf = name.rpartition(".")
    if leaf in ("fc1", "fc2") and isinstance(teacher.get_submodule(parent), StackedExperts):
        return getattr(teacher.get_submodule(parent), leaf).detach()
    return teacher.get_submodule(name).weight.detach()


def _latent(W: torch.Tensor, part_packed: dict, fmt: BinaryFormat, k: int) -> torch.Tensor:
    Wf = W.float()
    if fmt.row_scale:
        Wf = Wf / part_packed["row_scale"].float()[..., :, None]
    return (Wf - part_packed["beta"].float()[..., None, :]) / part_packed["alpha"].float()[..., None, :].clamp(min=1e-8)


def make_trainable(student: nn.Module, teacher: nn.Module | None, ste: bool) -> dict[str, nn.Module]:
    """Swap the binary modules of ``student`` for trainable stand-ins (in place); returns ``{name: stand-in}``."""
    if ste and teacher is None:
        raise ValueError("ste=True needs the teacher's float weights")
    swapped = {}
    for name, mod in list(student.named_modules()):
        if isinstance(mod, BinaryLinear):
            latent = _latent(_teacher_weight(teacher, name), mod.packed(), mod.fmt, mod.in_features) if ste else None
            new = _TrainableLinear(mod, latent)
        elif isinstance(mod, QuantExperts) and any(
                isinstance(getattr(mod, w), PackedExpertWeight) and is_binary(getattr(mod, w).fmt)
                for w in ("fc1", "fc2")):
            latents = {}
            if ste:
                for w in ("fc1", "fc2"):
                    pw = getattr(mod, w)
                    if isinstance(pw, PackedExpertWeight) and is_binary(pw.fmt):
                        latents[w] = _latent(_teacher_weight(teacher, f"{name}.{w}"), pw.packed(), pw.fmt, pw.k)
            new = _TrainableExperts(mod, latents)
        else:
            continue
        set_submodule(student, name, new)
        swapped[name] = new
    return swapped


def write_back(student: nn.Module, swapped: dict[str, nn.Module]) -> None:
    """Replace the stand-ins by packed ``BinaryLinear``/``BinaryExperts`` modules again."""
    for name, new in swapped.items():
        mod = new.to_module()
        mod.requires_grad_(False)
        set_submodule(student, name, mod)


def _is_norm(name: str) -> bool:
    return name.endswith(("norm.weight", "norm.bias")) or name.startswith("norm_f.")


def trainable_groups(student: nn.Module, opts: DistillOptions) -> tuple[list[dict], list[str]]:
    """Parameter groups (binary params, STE latents, extra float params) and the names of all trained tensors."""
    binary, latents, extra, names, seen = [], [], [], [], set()
    for name, p in student.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if ".w." in f".{name}" or ".parts." in name:
            if leaf == "latent":
                latents.append(p)
            else:
                binary.append(p)
        elif name in NEVER_TRAINED or name.endswith(NEVER_TRAINED):
            continue
        elif (opts.train_norms and _is_norm(name)) or opts.train_float:
            extra.append(p)
        else:
            continue
        names.append(name)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in binary + latents + extra:
        p.requires_grad_(True)
    groups = [{"params": binary, "lr_scale": 1.0}]
    if latents:
        groups.append({"params": latents, "lr_scale": (opts.latent_lr or opts.lr) / opts.lr})
    if extra:
        groups.append({"params": extra, "lr_scale": 1.0})
    return groups, names


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean per-token ``KL(teacher || student)`` of ``[..., V]`` logits (soft cross-entropy minus the teacher's
    entropy: same gradient)."""
    rows = student_logits.numel() // student_logits.shape[-1]
    return kl_sum(student_logits, teacher_logits, temperature) / rows * temperature ** 2


def step_loss(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, opts: DistillOptions) -> torch.Tensor:
    """The distillation loss of one batch ``[B, L]``, as :func:`distill` trains on it (memory options of ``opts``)."""
    return student_teacher_kl(student, teacher, batch, opts.temperature, opts.checkpoint_blocks,
                              opts.loss_chunk_rows)


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _trained_state(student: nn.Module, names: list[str]) -> dict:
    params = dict(student.named_parameters())
    return {n: params[n].detach().cpu() for n in names}


def data_signature(ids: torch.Tensor) -> dict:
    """What a resumed run must share with the saved one: the calibration sequences (count, length, content)."""
    digest = hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"nsamples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "sha256": digest}


def _save(directory: Path, student, names, optimizer, step: int, elapsed: float, opts: DistillOptions,
          data: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save({"step": step, "elapsed": elapsed, "options": asdict(opts), "params": _trained_state(student, names),
                "optimizer": optimizer.state_dict(), "data": data}, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)


def _load_state(path: Path, mmap: bool = False) -> dict | None:
    """The saved distillation state at ``path`` (``None`` when there is none yet); ``mmap``: tensors stay on disk."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise UserError(f"cannot read distillation checkpoint {path}: {one_line(exc)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict) or "step" not in state:
        raise UserError(f"{path} is not a qmamba distillation checkpoint")
    return state


def check_resume_data(directory, ids: torch.Tensor) -> None:
    """Refuse a distillation checkpoint in ``directory`` made on other calibration sequences than ``ids``, before
    any calibration work (the quantizer calls this as soon as it has the data; :func:`distill` checks again)."""
    path = Path(directory) / CHECKPOINT_FILE
    state = _load_state(path, mmap=True)
    if state is not None:
        _check_data(path, state, data_signature(ids))


def _check_data(path: Path, state: dict, data: dict) -> None:
    saved_data = state.get("data") or {}
    for key, option in (("nsamples", "--nsamples"), ("seq_len", "--seq-len")):
        if key in saved_data and saved_data[key] != data[key]:
            raise DistillationError(f"distillation checkpoint {path} was made with {option} {saved_data[key]}, this "
                                    f"run has {option} {data[key]}: use the same value, or another "
                                    "--distill-checkpoint directory")
    if saved_data.get("sha256", data["sha256"]) != data["sha256"]:
        raise DistillationError(f"distillation checkpoint {path} was made on other calibration sequences (other "
                                "--calib, --seed or tokenizer): use the same ones, or another --distill-checkpoint "
                                "directory")


def _resume(directory: Path, student, names, optimizer, data: dict) -> tuple[int, float]:
    path = directory / CHECKPOINT_FILE
    state = _load_state(path)
    if state is None:
        return 0, 0.0
    _check_data(path, state, data)
    params = dict(student.named_parameters())
    saved = state["params"]
    if sorted(saved) != sorted(names) or any(tuple(saved[n].shape) != tuple(params[n].shape) for n in names):
        raise UserError(f"distillation checkpoint {path} was made for other trainable tensors (different model or "
                        "flags); delete it or choose another --distill-checkpoint directory")
    with torch.no_grad():
        for n in names:
            params[n].copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["elapsed"])


# ---- the loop ------------------------------------------------------------------------------------------------
def distill(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, opts: DistillOptions | None = None,
            log=None) -> dict:
    """Distill ``student`` (modified in place) towards ``teacher`` on ``ids [N, L]``; returns a report dict."""
    opts = opts or DistillOptions()
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise UserError("distillation needs calibration sequences of at least 2 tokens")
    device = ids.device
    teacher.eval().requires_grad_(False)
    swapped = make_trainable(student, teacher, opts.ste)
    if not swapped:
        raise UserError("nothing to distill: the model has no binary (1-bit) modules")
    groups, names = trainable_groups(student, opts)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=0.0, betas=(0.9, 0.95), **fused)
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else None
    data = data_signature(ids)
    step, elapsed = _resume(ckpt_dir, student, names, optimizer, data) if ckpt_dir else (0, 0.0)
    start_step = step
    if start_step and log is not None:
        remaining = max(0, opts.steps - start_step)
        log(f"distillation: resumed from step {start_step} of {opts.steps} ({ckpt_dir / CHECKPOINT_FILE}); "
            + (f"{remaining} steps to run" if remaining else
               "0 steps to run: the checkpoint is already there (raise --distill-steps to train further)"))
    gen = torch.Generator().manual_seed(opts.seed + step)
    history, losses = [], []
    blocks_report = None
    student.train()
    bar = tqdm(total=opts.steps, initial=step, desc="distill", unit="step", disable=not opts.progress,
               dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    stop = "steps"
    try:
        with fast_training_scan(student), fast_training_scan(teacher):
            if opts.block_steps and start_step == 0:  # a resumed run already has its matched blocks
                blocks_report = match_blocks(student, teacher, ids, opts.block_steps, opts.lr, opts.batch_size,
                                             opts.grad_clip, opts.seed, opts.progress, log)
            while step < opts.steps:
                if opts.time_budget is not None and time.perf_counter() - t0 >= opts.time_budget:
                    stop = "time"
                    break
                lr = cosine_lr(step, opts.steps, opts.lr, opts.warmup, opts.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                rows = torch.randint(0, ids.shape[0], (min(opts.batch_size, ids.shape[0]),), generator=gen)
                batch = ids[rows.to(device)]
                loss = step_loss(student, teacher, batch, opts)
                if not torch.isfinite(loss):
                    raise DistillationError(f"distillation loss is {float(loss)} at step {step}: training "
                                            "diverged; lower --distill-lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], opts.grad_clip)
                optimizer.step()
                step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(kl=f"{losses[-1]:.4f}")
                if step % 10 == 0 or step == opts.steps:
                    history.append({"step": step, "kl": sum(losses[-10:]) / len(losses[-10:]), "lr": lr})
                if ckpt_dir and step % opts.checkpoint_every == 0:
                    _save(ckpt_dir, student, names, optimizer, step, time.perf_counter() - t0, opts, data)
    finally:
        bar.close()
        student.eval()
    seconds = time.perf_counter() - t0
    if ckpt_dir and step > start_step:
        _save(ckpt_dir, student, names, optimizer, step, seconds, opts, data)
    flips = _sign_flips(swapped) if opts.ste else None
    write_back(student, swapped)
    student.requires_grad_(False)
    report = {"steps": step, "resumed_from": start_step, "stopped_by": stop, "seconds": round(seconds, 1),
              "tokens": int(step * min(opts.batch_size, ids.shape[0]) * ids.shape[1]),
              "first_kl": losses[0] if losses else None, "last_kl": (sum(losses[-10:]) / len(losses[-10:]))
              if losses else None, "trained": _summarize_names(names), "sign_flips": flips,
              "options": asdict(opts), "history": history, "block_matching": blocks_report}
    if log is not None and losses:
        resumed = f" (steps {start_step + 1}..{step}, resumed)" if start_step else ""
        log(f"distillation: {step - start_step} steps{resumed} in {seconds - elapsed:.0f} s, KL "
            f"{report['first_kl']:.4f} -> {report['last_kl']:.4f}")
    elif log is not None and stop == "time":
        log(f"distillation: 0 steps run: the --distill-time budget ({opts.time_budget:g} s) was already spent "
            f"({elapsed:.0f} s in the checkpoint)")
    report["steps_run"] = step - start_step
    return report


@torch.no_grad()
def _sign_flips(swapped: dict) -> float:
    """Fraction of signs that changed from their initial (PTB) value (STE only)."""
    changed = total = 0
    for new in swapped.values():
        parts = [new.w] if isinstance(new, _TrainableLinear) else list(new.parts.values())
        for part in parts:
            if part.latent is None:
                continue
            init = layout.unpack_signs(_initial_bits(new, part), part.k)
            now = (part.latent >= 0).to(torch.uint8)
            now = torch.where(part.alpha[..., None, :] < 0, 1 - now, now)
            changed += int((init != now).sum())
            total += init.numel()
    return changed / total if total else 0.0


def _initial_bits(new, part) -> torch.Tensor:
    if isinstance(new, _TrainableLinear):
        return new.initial_qweight
    return getattr(new.src, [k for k, v in new.parts.items() if v is part][0]).qweight


def _summarize_names(names: list[str]) -> dict:
    kinds: dict[str, int] = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        kinds[leaf] = kinds.get(leaf, 0) + 1
    return kinds

