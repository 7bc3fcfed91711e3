"""The prefill's side-stream plan (qmamba/prefill_ahead.py): which projections' dequantization passes each Mamba
mixer queues early, and on the GPU a prefill with the plan equal, bit for bit, to one without it (eager and
captured), every queued pass taken."""

import contextlib
import dataclasses

import pytest
import torch

from qmamba.config import preset
from qmamba.kernel_view import linear_weight
from qmamba.prefill_ahead import PrefillAhead, prefill_ahead
from qmamba.quant.formats import Int4Format
from qmamba.testing import quantize_rtn, random_model


def _model(name, device, dtype=torch.float32, float_xdt=False):
    return quantize_rtn(random_model(preset(name), device, dtype), Int4Format(32), float_xdt=float_xdt)


@pytest.mark.parametrize("float_xdt", [False, True])
def test_each_mixer_queues_its_later_projections_and_the_next_in_proj(monkeypatch, float_xdt):
    from qmamba.kernels import triton_ops

    model = _model("tiny-blackmamba", "cpu", float_xdt=float_xdt)
    mixers = [b.mixer for b in model.blocks if b.is_mamba]
    names = {linear_weight(getattr(m, p))[0].qweight.data_ptr(): f"{i}.{p}"
             for i, m in enumerate(mixers) for p in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    monkeypatch.setattr(triton_ops, "issue_dequantization", lambda w, rows, dtype, queued: issued.append(
        (names[w.qweight.data_ptr()], rows, dtype, queued)))
    issued = []
    plan = PrefillAhead(mixers, 96, torch.bfloat16)
    for m in mixers:
        plan.before_mixer(m)
    nxt = ("in_proj",) if float_xdt else ("in_proj", "x_proj", "dt_proj")  # float projections: no pass
    want = [f"0.{p}" for p in nxt]
    for i in range(len(mixers)):
        want += [f"{i}.out_proj"] + ([f"{i + 1}.{p}" for p in nxt] if i + 1 < len(mixers) else [])
    assert [q[0] for q in issued] == want
    assert {q[1:] for q in issued} == {(96, torch.bfloat16, True)}  # queued: started before each scan
    # the key the pass is taken by: the record the matmul rebuilds has the same packed storage
    m = mixers[0].in_proj
    assert linear_weight(m)[0].qweight.data_ptr() == m.kernel_weight().qweight.data_ptr()


def test_off_cuda_the_plan_does_nothing():
    model = _model("tiny-mamba", "cpu").set_backend("triton")
    with prefill_ahead(model, 64) as plan:
        assert not isinstance(plan, PrefillAhead)
        plan.before_mixer(model.blocks[0].mixer)


@pytest.mark.parametrize("name", ["tiny-blackmamba", "tiny-mamba"])
@torch.no_grad()
def test_prefill_with_side_stream_equals_without(name, device, monkeypatch):
    if device.type != "cuda":
        pytest.skip("the side stream needs a GPU (scripts/gpu_check.sh)")
    from qmamba.graph_prefill import GraphPrefill
    from qmamba.kernels import side_stream
    from qmamba.kernels.matmul_configs import current_policy, using_policy

    model = _model(name, device, torch.bfloat16).set_backend("triton")
    scopes = []
    real = side_stream.side_work

    @contextlib.contextmanager
    def recorded(*args, **kwargs):
        with real(*args, **kwargs) as work:
            yield work
            scopes.append((work.issued, work.taken, work.pending))

    monkeypatch.setattr(side_stream, "side_work", recorded)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), device=device)
    off = dataclasses.replace(current_policy(), prefill_side_stream=False)
    with using_policy(off):
        plain = model.prefill(ids)
        graph_plain = GraphPrefill(model, max_chunk=32, min_chunk=16).prefill(ids)
    assert scopes == []
    got = model.prefill(ids)
    graph_got = GraphPrefill(model, max_chunk=32, min_chunk=16).prefill(ids)
    for a, b in ((got, plain), (graph_got, graph_plain)):
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1].ssm_state, b[1].ssm_state) and torch.equal(a[1].conv_state, b[1].conv_state)
    assert scopes and all(issued > 0 and issued == taken and pending == 0 for issued, taken, pending in scopes)
