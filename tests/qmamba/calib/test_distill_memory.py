"""Distillation's memory options (qmamba.calib.checkpointed_stream, qmamba.calib.chunked_kl): block checkpointing
and the chunked full-vocabulary KL give the loss and gradients of the plain forward, and keep far fewer bytes for
the backward pass."""

import copy

import pytest
import torch

from qmamba.calib.distill import DistillOptions, distill_loss, make_trainable, step_loss, trainable_groups
from qmamba.calib.train_scan import fast_training_scan
from qmamba.config import preset
from qmamba.quant.binary import BinaryFormat
from qmamba.testing import SavedTensorBytes, quantize_rtn, random_model

PLAIN = {"checkpoint_blocks": False, "loss_chunk_rows": None}


def _pair(ste: bool):
    """(trainable 1-bit student with every kind of trained tensor, float teacher) of tiny-blackmamba."""
    teacher = random_model(preset("tiny-blackmamba"), seed=1).eval().requires_grad_(False)
    student = quantize_rtn(copy.deepcopy(teacher), BinaryFormat(), head=False)
    make_trainable(student, teacher, ste)
    trainable_groups(student, DistillOptions(ste=ste, train_norms=True, train_float=True))
    return student.train(), teacher


def _loss_and_grads(student, teacher, batch, **memory):
    student = copy.deepcopy(student)  # the same state for every variant
    with fast_training_scan(student), fast_training_scan(teacher):
        loss = step_loss(student, teacher, batch, DistillOptions(temperature=1.5, **memory))
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("ste", [False, True], ids=["fixed-signs", "ste"])
def test_checkpointed_and_chunked_step_gives_the_plain_loss_and_gradients(ste):
    student, teacher = _pair(ste)
    batch = torch.randint(0, student.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(student, teacher, batch, **PLAIN)
    with torch.no_grad(), fast_training_scan(student), fast_training_scan(teacher):  # the loss as distill had it
        torch.testing.assert_close(loss, distill_loss(student(batch), teacher(batch), 1.5), rtol=1e-6, atol=0)
    assert {n.rsplit(".", 1)[-1] for n in grads} >= {"alpha", "beta", "weight", "bias", "A_log", "D"}
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())
    for memory in ({"checkpoint_blocks": True, "loss_chunk_rows": None},
                   {"checkpoint_blocks": False, "loss_chunk_rows": 7},   # 60 rows: 8 full chunks and one of 4
                   {"checkpoint_blocks": True, "loss_chunk_rows": 16}):
        other_loss, other_grads = _loss_and_grads(student, teacher, batch, **memory)
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=0, msg=str(memory))
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{name} {memory}")


def _saved_bytes(student, teacher, batch, **memory) -> int:
    weights = [*student.parameters(), *student.buffers(), *teacher.parameters(), *teacher.buffers()]
    with fast_training_scan(student), fast_training_scan(teacher), SavedTensorBytes(weights) as saved:
        step_loss(student, teacher, batch, DistillOptions(**memory))
    return saved.nbytes


def test_checkpointing_keeps_a_fraction_of_the_bytes_for_backward():
    student, teacher = _pair(ste=False)
    batch = torch.randint(0, student.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    plain = _saved_bytes(student, teacher, batch, **PLAIN)
    lean = _saved_bytes(student, teacher, batch, checkpoint_blocks=True, loss_chunk_rows=128)
    # what stays: one fp32 residual per block (4 x 2 x 256 x 64 x 4 B = 512 KiB), the last block's output and the
    # teacher's final stream (the chunks' inputs, views of those)
    d = student.config.d_model
    assert lean <= (len(student.blocks) + 3) * batch.numel() * d * 4, (plain, lean)
    assert lean < plain / 10, (plain, lean)
