"""Block-output matching: the first stage of 1-bit distillation (``DistillOptions.block_steps``).

Before the logit-level KL of :func:`qmamba.calib.distill.distill`, each block of the student is trained on its own,
in model order, to reproduce the float teacher's residual stream after that block:

    stream_T[i] = stream_T[i-1] + teacher_block_i(stream_T[i-1])         (fixed targets, float model)
    stream_S[i] = stream_S[i-1] + student_block_i(stream_S[i-1])         (input: the student's own stream so far)
    loss_i      = mean((stream_S[i] - stream_T[i])^2) / mean((stream_T[i] - stream_T[i-1])^2)

so block ``i`` also learns to cancel the error that the blocks before it left in the stream (block reconstruction
in the spirit of BRECQ, on Bi-Mamba's 1-bit parameters). Only the block's trainable tensors move (those the KL stage
trains: ``alpha``/``beta``/``row_scale`` of its binary matrices, STE latents, norms if asked). A step runs one block
forward and backward on a few calibration rows, so it is far cheaper than a KL step through the whole model, and only
one block's activations are alive at a time. The loss is normalised by the energy of the teacher block's own output,
so 1.0 means "as far off as the block's whole contribution" and the figures compare across blocks.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpointed_stream import block_output

MAX_ROWS = 64  # calibration sequences whose streams are kept (two fp32 [rows, L, d_model] tensors)


def block_stream(model: nn.Module, block, stream: torch.Tensor) -> torch.Tensor:
    """The residual stream after ``block`` given the stream before it (``[B, L, d]`` fp32), from zero SSM state."""
    return stream + block_output(block, stream, model.compute_dtype).float()


@torch.no_grad()
def _streams(model: nn.Module, block: nn.Module, stream: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([block_stream(model, block, stream[i:i + chunk]) for i in range(0, stream.shape[0], chunk)])


def match_blocks(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, steps: int, lr: float, batch_size: int,
                 grad_clip: float = 1.0, seed: int = 0, progress: bool = True, log=None) -> dict:
    """Train each block of ``student`` for ``steps`` Adam steps to match ``teacher``'s stream after it (see the
    module docstring). The student's trainable tensors are those with ``requires_grad`` (set by the caller); blocks
    without any are only run forward. Returns ``{"steps_per_block", "seconds", "blocks": [{"index", "first",
    "last"}]}`` with the normalised loss of each trained block at its first and last steps (means of up to 5)."""
    rows = min(ids.shape[0], max(MAX_ROWS, batch_size))
    ids = ids[:rows]
    chunk = max(1, batch_size)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    report = []
    with torch.no_grad():
        s_teacher = teacher.embedding(ids).float()
        s_student = student.embedding(ids).float()
    bar = tqdm(total=len(student.blocks), desc="block matching", unit="block", disable=not progress,
               dynamic_ncols=True)
    try:
        for t_block, s_block in zip(teacher.blocks, student.blocks):
            target = _streams(teacher, t_block, s_teacher, chunk)
            params = [p for p in s_block.module.parameters() if p.requires_grad]
            if params:
                scale = float((target - s_teacher).pow(2).mean()) or 1.0
                optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
                losses = []
                for _ in range(steps):
                    pick = torch.randint(0, rows, (min(batch_size, rows),), generator=gen).to(ids.device)
                    out = block_stream(student, s_block, s_student[pick])
                    loss = (out - target[pick]).pow(2).mean() / scale
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    bar.set_postfix(block=s_block.index, loss=f"{losses[-1]:.4f}")
                k = min(5, len(losses))
                report.append({"index": s_block.index, "first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k})
            s_student = _streams(student, s_block, s_student, chunk)
            s_teacher = target
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if log is not None and report:
        first = sum(r["first"] for r in report) / len(report)
        last = sum(r["last"] for r in report) / len(report)
        log(f"block matching: {len(report)} blocks x {steps} steps in {seconds:.0f} s, normalised block-output "
            f"error {first:.4f} -> {last:.4f} (mean over blocks)")
    return {"steps_per_block": steps, "seconds": round(seconds, 1), "blocks": report}
