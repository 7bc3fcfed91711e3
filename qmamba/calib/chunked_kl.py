"""The distillation loss, the per-token ``KL(teacher || student)`` over the full vocabulary, with little memory.

:func:`kl_sum` is the loss's one expression (summed over rows; :func:`qmamba.calib.distill.distill_loss` divides
it by the row count). :func:`student_teacher_kl` computes the loss of ``student`` against ``teacher`` on a batch of
ids. Either all at once, as ``distill_loss(student(ids), teacher(ids))`` does, or, with ``chunk_rows``, in chunks
of token positions: each chunk's final norm + head + log-softmax of student and teacher + KL runs under activation
checkpointing, so at most one chunk's ``[rows, V]`` fp32 tensors exist at a time (in the forward, and again in the
backward when the chunk is recomputed), never the full-vocabulary logits of the whole batch. The teacher's head runs
under ``torch.no_grad()`` in both passes (twice per chunk: the price of not keeping its logits). Its blocks run once,
under ``torch.no_grad()``, as stored (no copy, no dtype change). ``checkpoint_blocks`` checkpoints the student's
blocks too (:mod:`qmamba.calib.checkpointed_stream`).

Chunked or not, the loss and its gradients are the same up to float rounding (the sum over rows is taken in
another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checkpointed_stream import residual_stream


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``sum over rows of KL(softmax(teacher / T) || softmax(student / T))`` of ``[..., V]`` logits, in fp32."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def _chunk_kl_sum(student, teacher, s_residual, s_h, t_residual, t_h, temperature: float) -> torch.Tensor:
    """:func:`kl_sum` of the rows given as final-norm inputs (``model._logits`` of the residual stream)."""
    with torch.no_grad():
        teacher_logits = teacher._logits(t_residual, t_h)
    return kl_sum(student._logits(s_residual, s_h), teacher_logits, temperature)


def student_teacher_kl(student, teacher, input_ids: torch.Tensor, temperature: float = 1.0,
                       checkpoint_blocks: bool = False, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean per-token ``KL(teacher || student)`` (times ``T**2``) on ``input_ids [B, L]``, differentiable in the
    student's trainable tensors. ``checkpoint_blocks``: the student's blocks under activation checkpointing.
    ``chunk_rows``: the head and loss in checkpointed chunks of that many token positions (None: all at once)."""
    with torch.no_grad():
        t_residual, t_h = residual_stream(teacher, input_ids)
    s_residual, s_h = residual_stream(student, input_ids, checkpoint_blocks)
    rows = input_ids.numel()
    flat = [x.reshape(rows, x.shape[-1]) for x in (s_residual, s_h, t_residual, t_h)]
    size = rows if chunk_rows is None else chunk_rows
    total = None
    for start in range(0, rows, size):
        args = (student, teacher, *(x[start:start + size] for x in flat), temperature)
        part = _chunk_kl_sum(*args) if chunk_rows is None else checkpoint(_chunk_kl_sum, *args, use_reentrant=False)
        total = part if total is None else total + part
    return total / rows * temperature ** 2
