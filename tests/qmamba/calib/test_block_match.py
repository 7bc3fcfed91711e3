"""Block-output matching (the first stage of 1-bit distillation): each block of the PTB student moves towards the
float teacher's residual stream after it, only its own 1-bit parameters train, and ``distill`` runs it before the
KL stage when ``block_steps`` is set (and reports it), leaving a student closer to the teacher than PTB."""

import copy

import pytest
import torch

from qmamba.calib.block_match import block_stream, match_blocks
from qmamba.calib.distill import DistillOptions, distill, distill_loss, make_trainable, trainable_groups, write_back
from qmamba.errors import ConfigError


def _kl(student, teacher, ids):
    with torch.no_grad():
        return float(distill_loss(student(ids), teacher(ids)))


@torch.no_grad()
def _stream_errors(student, teacher, ids):
    """Per block: mean squared distance of the student's stream (on its own inputs) from the teacher's."""
    s_s = student.embedding(ids).float()
    s_t = teacher.embedding(ids).float()
    errors = []
    for b_s, b_t in zip(student.blocks, teacher.blocks):
        s_s, s_t = block_stream(student, b_s, s_s), block_stream(teacher, b_t, s_t)
        errors.append(float((s_s - s_t).pow(2).mean()))
    return errors


def test_block_stream_walk_equals_the_model_forward(ptb_pair):
    _, teacher, ids = ptb_pair
    stream = teacher.embedding(ids[:2]).float()
    for block in teacher.blocks:
        stream = block_stream(teacher, block, stream)
    with torch.no_grad():
        logits = teacher.lm_head(teacher.norm_f(stream, teacher.compute_dtype))
        assert torch.allclose(logits, teacher(ids[:2]), atol=1e-5, rtol=1e-5)


def test_matching_moves_every_block_towards_the_teacher(ptb_pair):
    student, teacher, ids = ptb_pair
    student = copy.deepcopy(student)
    before = _stream_errors(student, teacher, ids)
    swapped = make_trainable(student, teacher, ste=False)
    trainable_groups(student, DistillOptions())
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    report = match_blocks(student, teacher, ids, steps=15, lr=3e-3, batch_size=4, progress=False)
    for n, p in student.named_parameters():  # nothing but the 1-bit parameters moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    write_back(student, swapped)
    after = _stream_errors(student, teacher, ids)
    trained = report["blocks"]
    assert len(trained) == len(student.blocks) and report["steps_per_block"] == 15
    assert all(r["last"] < r["first"] for r in trained), trained
    assert after[-1] < 0.8 * before[-1], (before, after)   # the stream that feeds the head


def test_distill_runs_block_matching_first(ptb_pair):
    student, teacher, ids = ptb_pair
    plain, matched = copy.deepcopy(student), copy.deepcopy(student)
    kl_ptb = _kl(student, teacher, ids)
    opts = dict(steps=4, lr=3e-3, warmup=1, progress=False)
    r_plain = distill(plain, teacher, ids, DistillOptions(**opts))
    r_matched = distill(matched, teacher, ids, DistillOptions(block_steps=10, **opts))
    assert r_plain["block_matching"] is None
    assert len(r_matched["block_matching"]["blocks"]) == len(student.blocks)
    assert _kl(matched, teacher, ids) < _kl(plain, teacher, ids) < kl_ptb


def test_block_steps_must_be_a_count():
    with pytest.raises(ConfigError, match="block_steps"):
        DistillOptions(block_steps=-1)
