"""Chunked / CUDA-graph prefill (qmamba/graph_prefill.py) against one whole prefill of the same tokens."""

import pytest
import torch

from qmamba.config import preset
from qmamba.graph_prefill import GraphPrefill, chunk_plan
from qmamba.quant.formats import Int4Format
from qmamba.testing import quantize_rtn, random_model


@pytest.mark.parametrize("length,max_chunk,min_chunk,chunks,tail", [
    (2048, 2048, 16, [2048], 0), (37, 16, 4, [16, 16, 4], 1), (3, 16, 4, [], 3), (100, 64, 1, [64, 32, 4], 0),
    (2500, 2048, 16, [2048, 256, 128, 64], 4), (0, 8, 2, [], 0)])
def test_chunk_plan(length, max_chunk, min_chunk, chunks, tail):
    got, left = chunk_plan(length, max_chunk, min_chunk)
    assert (got, left) == (chunks, tail)
    assert sum(got) + left == length


@pytest.mark.parametrize("max_chunk,min_chunk", [(8, 3), (6, 2), (4, 8), (4, 0)])
def test_chunk_plan_rejects_bad_lengths(max_chunk, min_chunk):
    with pytest.raises(ValueError, match="powers of two"):
        chunk_plan(10, max_chunk, min_chunk)


def _model(name, device, backend):
    model = quantize_rtn(random_model(preset(name), device), Int4Format(32))
    return model.set_backend(backend)


@pytest.mark.parametrize("name,backend", [("tiny-blackmamba", "reference"), ("tiny-mamba", "reference"),
                                          ("tiny-blackmamba", "triton"), ("tiny-mamba", "triton")])
@torch.no_grad()
def test_chunked_prefill_equals_whole_prefill(name, backend, device):
    """The chunk loop (eager here, the same loop that replays graphs on CUDA) carries the state exactly: the last
    logits and the final state equal one prefill over all tokens, also from a non-zero starting state. The Triton
    backend runs on the GPU only: under the interpreter each case takes ~100 s, and its prefill from a given state
    is covered on CPU by test_fused_step.py and the scan / conv kernel tests."""
    if backend == "triton" and device.type != "cuda":
        pytest.skip("Triton backend: GPU only (scripts/gpu_check.sh)")
    model = _model(name, device, backend)
    ids = torch.randint(0, model.config.vocab_size, (2, 26), device=device)
    prefill = GraphPrefill(model, max_chunk=16, min_chunk=4, capture=False)  # 21 tokens: 16 + 4, tail 1
    _, start = model.prefill(ids[:, :5])
    for init in (None, start):
        whole_logits, whole_state = model.prefill(ids[:, 5:], init)
        logits, state = prefill.prefill(ids[:, 5:], init)
        assert logits.shape == (2, 1, model.config.vocab_size)
        torch.testing.assert_close(logits, whole_logits[:, -1:], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(state.ssm_state, whole_state.ssm_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.conv_state, whole_state.conv_state, atol=1e-5, rtol=1e-5)
    zero_start = prefill.prefill(ids[:, 5:])[1]  # the starting state above was used, not a zero one
    assert not torch.allclose(zero_start.ssm_state, state.ssm_state, atol=1e-3)
    if backend == "reference":  # every position's logits, chunk after chunk (26 tokens: 16 + 8, tail 2)
        all_logits, _ = prefill.prefill(ids, last_only=False)
        torch.testing.assert_close(all_logits, model.prefill(ids)[0], atol=2e-3, rtol=2e-3)


def test_graph_prefill_refuses_what_it_cannot_capture():
    model = random_model(preset("tiny-mamba"), torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        GraphPrefill(model)
    with pytest.raises(ValueError, match="powers of two"):
        GraphPrefill(model, max_chunk=100, capture=False)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        GraphPrefill(model, capture=False).prefill(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("name", ["tiny-blackmamba", "tiny-mamba"])
@torch.no_grad()
def test_graph_prefill_on_gpu_equals_eager(name, device):
    """CUDA: the captured chunks (several lengths, one shared pool, replayed twice) give the eager prefill's logits
    and state; the reference backend is refused."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU (scripts/gpu_check.sh)")
    model = _model(name, device, "triton")
    prefill = GraphPrefill(model, max_chunk=64, min_chunk=8)
    ids = torch.randint(0, model.config.vocab_size, (3, 64 + 32 + 8 + 5), device=device)
    whole_logits, whole_state = model.prefill(ids)
    for _ in range(2):
        logits, state = prefill.prefill(ids)
        torch.testing.assert_close(logits, whole_logits[:, -1:], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(state.ssm_state, whole_state.ssm_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.conv_state, whole_state.conv_state, atol=1e-5, rtol=1e-5)
    assert {k[1] for k in prefill._chunks} == {64, 32, 8}
    assert all(c.graph is not None for c in prefill._chunks.values())
    with pytest.raises(ValueError, match="Triton backend"):
        GraphPrefill(_model(name, device, "reference"))


def _w4a8_model(device):
    """A bf16 int4 g128 BlackMamba wide enough for the W4A8 kernels' 128-column tiles, as load_model holds it."""
    import dataclasses

    from qmamba.quant.modules import use_plane_words

    cfg = dataclasses.replace(preset("tiny-blackmamba"), d_model=128, ffn_hidden=128)
    model = quantize_rtn(random_model(cfg, device, torch.bfloat16), Int4Format(128), float_xdt=True)
    use_plane_words(model)
    return model.set_backend("triton")


@torch.no_grad()
def test_model_int8_activations_is_the_w4a8_route(device):
    """CUDA: a model with ``int8_activations`` (what a checkpoint whose quantize check passed loads with) prefills
    exactly as under the W4A8 policy, eager and captured; off, as the default route."""
    if device.type != "cuda":
        pytest.skip("the W4A8 kernels need a GPU (scripts/gpu_check.sh)")
    from qmamba.kernels.matmul_configs import MatmulPolicy, using_policy

    model = _w4a8_model(device)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device=device)
    with using_policy(MatmulPolicy(w4a8_min_m=64)):
        want = model.prefill(ids, last_only=True)[0]
        want_graph = GraphPrefill(model, max_chunk=64, min_chunk=64).prefill(ids)[0]
    plain = model.prefill(ids, last_only=True)[0]
    model.int8_activations = True
    assert torch.equal(model.prefill(ids, last_only=True)[0], want)
    assert torch.equal(GraphPrefill(model, max_chunk=64, min_chunk=64).prefill(ids)[0], want_graph)
    assert not torch.equal(plain, want)
