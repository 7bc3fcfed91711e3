"""Step-by-step decoding reproduces the parallel forward's logits (every prompt length, batch 2), also when a
prefill is continued by steps or by a second prefill. Models come from qmamba checkpoints of the tiny presets."""

import copy

import pytest
import torch

from qmamba.checkpoints.load import build_model
from qmamba.checkpoints.random_init import random_state_dict
from qmamba.config import preset

TOTAL = 10


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=["tiny-blackmamba", "tiny-mamba"])
def model(request):
    cfg = preset(request.param)
    sd = random_state_dict(cfg, seed=7)
    g = torch.Generator().manual_seed(0)
    for name, t in sd.items():  # larger weights than the init: every path (conv, state, experts) matters
        if name.endswith(("conv_weight", "x_proj.weight", "dt_proj.weight", "in_proj.weight", "fc1", "fc2")):
            t.mul_(3.0).add_(0.05 * torch.randn(t.shape, generator=g))
    return build_model(cfg, sd, {}, "cpu", torch.float32)


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.config.vocab_size, (2, TOTAL), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def parallel(model, ids):
    return model(ids)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7])
def test_steps_from_empty_state_match_parallel(model, ids, length):
    full = model(ids[:, :length])
    state = model.new_state(2)
    for t in range(length):
        assert rel_err(model.step(ids[:, t], state), full[:, t]) <= 1e-4, t


@pytest.mark.parametrize("prompt", [1, 2, 3, 4, 7])
def test_prefill_then_steps_match_parallel(model, ids, parallel, prompt):
    logits, state = model.prefill(ids[:, :prompt])
    assert rel_err(logits, parallel[:, :prompt]) <= 1e-5
    for t in range(prompt, TOTAL):
        assert rel_err(model.step(ids[:, t], state), parallel[:, t]) <= 1e-4, t


@pytest.mark.parametrize("split", [1, 3, 6])
def test_prefill_continued_by_prefill(model, ids, parallel, split):
    first, state = model.prefill(ids[:, :split])
    second, _ = model.prefill(ids[:, split:], state)
    assert rel_err(torch.cat([first, second], 1), parallel) <= 1e-4


def test_batch_rows_are_independent(model, ids, parallel):
    alone = model(ids[1:])
    assert rel_err(alone, parallel[1:]) <= 1e-5


def test_prefill_last_only_keeps_the_last_position(model, ids, parallel):
    logits, state = model.prefill(ids, last_only=True)
    _, full_state = model.prefill(ids)
    assert logits.shape == (ids.shape[0], 1, parallel.shape[-1])
    assert rel_err(logits[:, 0], parallel[:, -1]) <= 1e-5
    assert torch.equal(state.ssm_state, full_state.ssm_state)


def test_triton_backend_adds_and_norms_in_one_op(model, device, monkeypatch):
    """On the Triton backend every block's residual add + norm (and the final one) is one ``add_norm`` call of that
    backend, and the logits equal the reference backend's (on ``device``: the interpreter on CPU, compiled on the
    GPU machine)."""
    from qmamba import ops
    from qmamba.norms import LayerNorm, RMSNorm

    model = copy.deepcopy(model).to(device)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref, _ = model.set_backend("reference").prefill(ids)
        calls = []
        real = ops.add_norm
        monkeypatch.setattr(ops, "add_norm", lambda backend, *a, **k: calls.append(backend) or real(backend, *a, **k))
        try:
            got, _ = model.set_backend("triton").prefill(ids)
        finally:
            model.set_backend("reference")
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, LayerNorm))]
    assert calls == ["triton"] * len(norms) and len(norms) == len(model.blocks) + 1
    assert rel_err(got, ref) < 1e-4
