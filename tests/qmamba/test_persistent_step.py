"""The decode step as one persistent launch (qmamba.persistent_step) against the fused step it replays (the same
kernel bodies: equal bit for bit on CPU) and against the reference model's step (an independent reference)."""

import dataclasses

import pytest
import torch

from qmamba.config import preset
from qmamba.fused_step import FusedDecodeStep
from qmamba.kernels.decode_linear import DecodePolicy
from qmamba.persistent_step import PersistentDecodeStep, UnsupportedLaunch
from qmamba.quant.binary import BinaryFormat
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.testing import quantize_rtn, random_model


def _policy(device, kind: str, batch: int = 1) -> DecodePolicy:
    policy = DecodePolicy.for_device(device)
    if kind == "cuda":  # the CUDA policy itself (at batch 2+: the general matmul kernel for dense matrices, split-K
        #                 into the zeroed workspace, and the conv step on its own; routed experts as row programs)
        return DecodePolicy.cuda(132, False)
    if kind == "cuda_like":  # the CUDA policy's choices that change kernels: plane words, denorm codes, input planes
        policy = dataclasses.replace(policy, formats=(0, 1, 3, 4), max_rows=1, max_rows_planes=1, int4_planes=True,
                                     int4_unpack="denorm", int4_x_planes=True, int4_x_in_tile=True,
                                     max_rows_routed=8, routed_row_programs=True, planes_mma=False,
                                     norm_plane_programs=4 if device.type == "cuda" else 1)
        if batch > 1:  # dense matrices on the decode kernels at this batch too (the CUDA policy's general kernels
            # have no registered body)
            policy = dataclasses.replace(policy, max_rows=8, max_rows_planes=8)
    elif kind == "decode":
        policy = dataclasses.replace(policy, formats=DecodePolicy().formats, int4_x_planes=False)
    return policy


CASES = [("tiny-blackmamba", "float", 1, "decode"), ("tiny-blackmamba", "int8", 2, "decode"),
         ("tiny-blackmamba", "int4g128", 1, "cuda_like"), ("tiny-blackmamba", "int4g128", 3, "cuda_like"),
         ("tiny-blackmamba", "binary", 1, "decode"), ("tiny-mamba", "int4g128", 1, "cuda_like"),
         ("tiny-blackmamba", "int4g128", 2, "cuda"), ("tiny-blackmamba", "float", 2, "cuda")]
FORMATS = {"float": None, "int8": Int8Format(), "int4g128": Int4Format(128), "binary": BinaryFormat()}


@pytest.mark.parametrize("name,fmt,batch,kind", CASES)
@torch.no_grad()
def test_persistent_step_replays_the_fused_step(name, fmt, batch, kind, device):
    model = random_model(preset(name), device)
    if FORMATS[fmt] is not None:
        model = quantize_rtn(model, FORMATS[fmt], sensitive_fmt=Int4Format(32) if fmt == "binary" else None)
    ids = torch.randint(0, model.config.vocab_size, (batch, 5), device=device)
    _, state = model.prefill(ids)
    fused_state, ref_state = state.clone(), state.clone()
    policy = _policy(device, kind, batch)
    step = PersistentDecodeStep(model, policy)
    fused = FusedDecodeStep(model, dataclasses.replace(policy, pdl=False))
    tok = ids[:, 2]  # a strided column, as generation loops pass it
    for _ in range(2 if kind == "cuda" else 3):  # the state carried from step to step (the general kernels: slow
        #                                          in the interpreter)
        logits = step(tok, state).clone()
        want = fused(tok, fused_state)
        if device.type == "cpu":  # the same bodies in the same order: the same numbers
            assert torch.equal(logits, want)
            assert torch.equal(state.ssm_state, fused_state.ssm_state)
            assert torch.equal(state.conv_state, fused_state.conv_state)
        else:
            torch.testing.assert_close(logits, want, atol=1e-3, rtol=1e-3)
        ref = model.step(tok, ref_state)
        torch.testing.assert_close(logits, ref.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-4, rtol=1e-4)
        tok = ref.argmax(-1)
    chain = next(iter(step._recorded.values())).chain
    n_layers = len(model.config.layers)
    assert len(chain.launches) >= n_layers * 3 + 2  # every layer's kernels in the one launch


@torch.no_grad()
def test_another_state_is_recorded_again(device):
    model = quantize_rtn(random_model(preset("tiny-blackmamba"), device), Int4Format(128))
    step = PersistentDecodeStep(model, _policy(device, "cuda_like"))
    ids = torch.randint(0, model.config.vocab_size, (1, 4), device=device)
    _, a = model.prefill(ids)
    _, b = model.prefill(ids.flip(1))
    a_ref, b_ref = a.clone(), b.clone()
    tok = ids[:, -1]
    la = step(tok, a).clone()
    lb = step(tok, b).clone()
    assert len(step._recorded) == 2
    torch.testing.assert_close(la, model.step(tok, a_ref).float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lb, model.step(tok, b_ref).float(), atol=1e-3, rtol=1e-3)
    assert not torch.equal(la, lb)


@torch.no_grad()
def test_a_batch_on_the_general_kernels_runs_the_fused_step(device):
    """The general matmul kernels have no registered body: such a batch size runs on the fused step instead."""
    model = random_model(preset("tiny-blackmamba"), device)
    step = PersistentDecodeStep(model, dataclasses.replace(DecodePolicy.for_device(device), formats=()))
    ids = torch.randint(0, model.config.vocab_size, (2, 4), device=device)
    _, state = model.prefill(ids)
    ref_state = state.clone()
    logits = step(ids[:, -1], state)
    assert step.fallback_batches == {2} and not step._recorded
    torch.testing.assert_close(logits, model.step(ids[:, -1], ref_state).float(), atol=1e-3, rtol=1e-3)
    with pytest.raises(UnsupportedLaunch, match="no registered body"):
        step._record(ids[:, -1], state)


def test_the_policy_picks_the_step():
    from qmamba.persistent_step import make_decode_step

    model = random_model(preset("tiny-mamba"), "cpu")
    policy = DecodePolicy.for_device(torch.device("cpu"))
    assert type(make_decode_step(model, policy)) is FusedDecodeStep
    step = make_decode_step(model, dataclasses.replace(policy, persistent=True, persistent_programs=1))
    assert isinstance(step, PersistentDecodeStep) and step.programs == 1


def test_the_profile_script_names_every_launch():
    """benchmarks/profile_persistent_step.py (GPU) imports on CPU and labels each recorded launch by its kernel."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from profile_persistent_step import _label

    model = quantize_rtn(random_model(preset("tiny-blackmamba"), "cpu"), Int4Format(128))
    step = PersistentDecodeStep(model, _policy(torch.device("cpu"), "cuda_like"))
    launches = step.record(torch.zeros(1, dtype=torch.long), model.new_state(1))[0]
    labels = [_label(launch) for launch in launches]
    assert labels[0] == "add_norm first" and "add_norm router" in labels
    assert any(label.startswith("decode_linear") and "routed gated" in label for label in labels)
    assert any("conv_epi" in label for label in labels) and "dt_state_update" in labels


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_graph_replay_of_the_persistent_step(batch, device):
    """GPU: the CUDA-graph decoder (what `qmamba generate` runs) with the persistent step, the CUDA policy, float32
    (split-K sums through atomics are not bitwise repeatable in bf16): logits as the fused step's eager ones, and
    ``generate`` as its own replays."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    from qmamba.cuda_graph import GraphDecoder

    model = quantize_rtn(random_model(preset("tiny-blackmamba"), device), Int4Format(128))
    model.set_backend("triton")
    policy = dataclasses.replace(DecodePolicy.for_device(device), persistent=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, 7), device=device)
    _, state = model.prefill(ids)
    eager_state = state.clone()
    decoder = GraphDecoder(model, policy=policy)
    eager = FusedDecodeStep(model, DecodePolicy.for_device(device))
    tok = ids[:, -1]
    for _ in range(4):
        got = decoder(tok, state)
        ref = eager(tok, eager_state)
        torch.testing.assert_close(got.float(), ref.float(), atol=1e-3, rtol=1e-3)
        tok = ref.argmax(-1)
    assert isinstance(decoder._step, PersistentDecodeStep) and not decoder._step.fallback_batches
    greedy = decoder.generate(tok, state.clone(), 5)
    st, t, manual = state.clone(), tok, []
    for _ in range(5):
        t = decoder(t, st).argmax(-1)
        manual.append(t)
    assert torch.equal(greedy, torch.stack(manual, 1))
