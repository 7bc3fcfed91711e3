"""Triton scan / state update / causal conv against the sequential PyTorch references (interpreter on CPU)."""

import os

import pytest
import torch

from qmamba.kernels.causal_conv1d import (causal_conv1d_ref, causal_conv1d_triton, causal_conv1d_update_ref,
                                          causal_conv1d_update_triton)
from qmamba.kernels.selective_scan import (_bc_fp32, chunked_step_knobs, selective_scan_ref, selective_scan_triton,
                                           selective_state_update_ref, selective_state_update_triton)

REAL = os.environ.get("QMAMBA_TEST_DEVICE") == "cuda"
# (B, L, D, N): small odd shapes on CPU; BlackMamba-2.8B's d_inner on the GPU
SCAN_SHAPES = [(2, 37, 20, 5), (1, 3, 7, 16)] + ([(2, 515, 2944, 16), (1, 2048, 2944, 16)] if REAL else [])
TOL = {torch.float32: dict(atol=2e-4, rtol=1e-3), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=5e-2)}


def scan_inputs(B, L, D, N, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # u and z as non-contiguous halves of one tensor, as in_proj(h).chunk(2) produces them
    uz = r(B, L, 2 * D).to(device, dtype)
    dbc = r(B, L, 3 + 2 * N).to(device, dtype)
    return dict(u=uz[..., :D], delta=(r(B, L, D) * 0.5).to(device, dtype),
                A=(-torch.rand(D, N, generator=g) * 2 - 0.05).to(device), B_ssm=dbc[..., 3:3 + N],
                C_ssm=dbc[..., 3 + N:], D_skip=r(D).to(device), z=uz[..., D:], delta_bias=(r(D) * 0.3).to(device))


def assert_scan_close(got, ref, dtype):
    torch.testing.assert_close(got[0].float(), ref[0].float(), **TOL[dtype])
    torch.testing.assert_close(got[1], ref[1], atol=2e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3)


@pytest.mark.parametrize("method", ["chunked", "assoc"])
@pytest.mark.parametrize("shape", SCAN_SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_matches_reference(method, shape, with_state, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    p = scan_inputs(*shape, device, dtype)
    if with_state:
        p["initial_state"] = torch.randn(shape[0], shape[2], shape[3], device=device)
    got = selective_scan_triton(**p, method=method)
    assert got[1].dtype == torch.float32 and got[0].dtype == dtype
    assert_scan_close(got, selective_scan_ref(**p), dtype)


def test_auto_method_picks_by_tokens(monkeypatch, device):
    """"auto" (the default) runs chunked from CHUNKED_MIN_TOKENS batch x length tokens, assoc below: both right."""
    import qmamba.kernels.selective_scan as scan

    calls = []
    for name in ("chunked", "assoc"):
        real = scan.METHODS[name]
        monkeypatch.setitem(scan.METHODS, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    monkeypatch.setattr(scan, "CHUNKED_MIN_TOKENS", 2 * 37)
    for batch, want in ((1, "assoc"), (2, "chunked")):
        p = scan_inputs(batch, 37, 20, 5, device, torch.float32, seed=batch)
        assert_scan_close(selective_scan_triton(**p), selective_scan_ref(**p), torch.float32)
        assert calls[-1] == want
    with pytest.raises(ValueError, match="unknown method"):
        selective_scan_triton(**scan_inputs(1, 3, 4, 2, device, torch.float32), method="fast")


# the chunked method's knobs: L = 37 is ragged for every unroll and segment length; 3 segments of 16, 16 and 5
# steps (unroll 4 or 8) exercise the summary pass and the carry-in over two earlier summaries; 10 asked for, one
# unroll of 4 steps each: 10 segments, the last one short (the carry-in walks 9 summaries)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,with_state", [(1, False), (2, True)])
@pytest.mark.parametrize("n_segments,unroll,bc_fp32,sp_log2,n", [
    (1, 4, False, False, 5), (3, 8, True, False, 5), (3, 4, False, False, 5), (10, 4, True, False, 5),
    (3, 4, True, True, 5), (1, 1, True, True, 16), (3, 1, False, True, 5), (10, 1, True, False, 16)])
def test_chunked_scan_knobs(dtype, batch, with_state, n_segments, unroll, bc_fp32, sp_log2, n, device):
    """``sp_log2``: dt's softplus through base-2 functions (``softplus_log2``; on CUDA one lg2.approx); one step a
    trip (``unroll`` 1, the CUDA default of a busy GPU) with 3 and 10 segments."""
    p = scan_inputs(batch, 37, 20, n, device, dtype, seed=4)
    if with_state:
        p["initial_state"] = torch.randn(batch, 20, n, device=device)
    got = selective_scan_triton(**p, method="chunked", n_segments=n_segments, unroll=unroll, bc_fp32=bc_fp32,
                                softplus_log2=sp_log2)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_scan_close(got, selective_scan_ref(**p), dtype)


def test_chunked_step_knobs_follow_the_warps_before_the_time_split():
    """4 steps a trip with the base-2 softplus once batch x channel blocks give a warp a multiprocessor of an H200
    (BlackMamba-2.8B's 2944 channels, 92 one-warp programs a batch row, from batch 2); 8 steps below that, with
    the base-2 softplus too since session 48 (session 46 had the exact one there); 4 steps and the exact softplus
    off CUDA."""
    assert chunked_step_knobs(1, 2944, 32, 1, True) == (8, True)
    assert chunked_step_knobs(2, 2944, 32, 1, True) == (4, True)
    assert chunked_step_knobs(8, 2944, 32, 1, True) == (4, True)
    assert chunked_step_knobs(1, 2944, 64, 2, True) == (8, True)  # 46 programs of 2 warps
    assert chunked_step_knobs(2, 2048, 32, 1, True) == (8, True)  # 2 x 64 = 128 warps: not yet
    assert chunked_step_knobs(3, 2048, 32, 1, True) == (4, True)
    assert chunked_step_knobs(64, 2944, 16, 1, False) == (4, False)


@pytest.mark.parametrize("adjacent", [True, False])
def test_bc_fp32_copies_b_and_c(adjacent, device):
    p = scan_inputs(2, 7, 4, 5, device, torch.bfloat16)
    B_ssm, C_ssm = p["B_ssm"], p["C_ssm"] if adjacent else p["C_ssm"].clone()
    b32, c32 = _bc_fp32(B_ssm, C_ssm)
    assert b32.dtype == c32.dtype == torch.float32 and b32.stride() == c32.stride() == (7 * 10, 10, 1)
    assert torch.equal(b32, B_ssm.float()) and torch.equal(c32, C_ssm.float())


def test_scan_rejects_unknown_method(device):
    with pytest.raises(ValueError, match="unknown method"):
        selective_scan_triton(**scan_inputs(1, 2, 3, 2, device, torch.float32), method="parallel")


@pytest.mark.parametrize("method", ["chunked", "assoc"])
def test_scan_optional_inputs_and_fp16(method, device):
    p = scan_inputs(2, 9, 12, 4, device, torch.float16, seed=3)
    for drop in ("z", "D_skip", "delta_bias"):
        q = dict(p, **{drop: None})
        assert_scan_close(selective_scan_triton(**q, delta_softplus=False, method=method),
                          selective_scan_ref(**q, delta_softplus=False), torch.float16)


@pytest.mark.parametrize("method", ["chunked", "assoc"])
def test_scan_chunks_carry_state(method, device):
    """Two calls with the state carried equal one call (exercises the initial-state input)."""
    p = scan_inputs(1, 21, 10, 6, device, torch.float32, seed=1)
    y, h = selective_scan_triton(**p, method=method)
    first = {k: (v[:, :8] if k in ("u", "delta", "B_ssm", "C_ssm", "z") else v) for k, v in p.items()}
    rest = {k: (v[:, 8:] if k in ("u", "delta", "B_ssm", "C_ssm", "z") else v) for k, v in p.items()}
    y1, h1 = selective_scan_triton(**first, method=method)
    y2, h2 = selective_scan_triton(**rest, initial_state=h1, method=method)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h2, h, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_place", [False, True])
def test_state_update_matches_reference(in_place, device):
    B, D, N = (3, 2944, 16) if device.type == "cuda" else (3, 19, 5)
    p = scan_inputs(B, 1, D, N, device, torch.float32, seed=2)
    step = {k: (v[:, 0] if k in ("u", "delta", "B_ssm", "C_ssm", "z") else v) for k, v in p.items()}
    step["x"] = step.pop("u")
    state = torch.randn(B, D, N, device=device)
    y_ref, h_ref = selective_state_update_ref(state, **step)
    y, h = selective_state_update_triton(state, **step, out_state=state if in_place else None)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-4)
    assert (h.data_ptr() == state.data_ptr()) == in_place


CONV_SHAPES = [(2, 13, 19, 4), (1, 2, 5, 4), (2, 1, 7, 3)] + ([(2, 2048, 2944, 4)] if REAL else [])


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_prefill_matches_reference(shape, with_state, device):
    B, L, D, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, 2 * D, generator=g).to(device)[..., :D]  # strided, as the in_proj chunk
    w, b = torch.randn(D, W, generator=g).to(device), torch.randn(D, generator=g).to(device)
    s = torch.randn(B, D, W, generator=g).to(device) if with_state else None
    y, f = causal_conv1d_triton(x, w, b, s)
    y_ref, f_ref = causal_conv1d_ref(x, w, b, s)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f, f_ref)
    y2, _ = causal_conv1d_triton(x, w, None, s, activation=None)
    torch.testing.assert_close(y2, causal_conv1d_ref(x, w, None, s, activation=None)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
def test_conv_update_steps_equal_prefill(in_place, device):
    B, L, D, W = 2, 6, 11, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, D, generator=g).to(device)
    w, b = torch.randn(D, W, generator=g).to(device), torch.randn(D, generator=g).to(device)
    y_full, s_full = causal_conv1d_ref(x, w, b)
    state = torch.zeros(B, D, W, device=device)
    for t in range(L):
        state_before = state.clone()
        y, new = causal_conv1d_update_triton(x[:, t], state, w, b, out_state=state if in_place else None)
        torch.testing.assert_close(y, y_full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(causal_conv1d_update_ref(x[:, t], state_before, w, b)[1], new)
        state = new
    torch.testing.assert_close(state, s_full)


def test_chunked_segments_heuristic():
    """Segments run in parallel where batch x channel blocks alone leave the H200's schedulers idle: BlackMamba-2.8B
    at batch 1 (92 one-warp programs of 32 channels) takes the cap of 16 from 1024 steps, fewer where segments would
    be shorter than ``min_steps`` (64); from a warp a multiprocessor before the split (batch 2) at most 8 (session
    46's timings); three at batch 64, one at batch 512; the caps are arguments."""
    from qmamba.kernels.selective_scan import chunked_segments

    assert chunked_segments(1, 2048, 2944, 32, 1, True) == 16
    assert chunked_segments(1, 1024, 2944, 32, 1, True) == 16
    assert chunked_segments(1, 512, 2944, 32, 1, True) == 8  # 64 steps a segment at least
    assert chunked_segments(1, 256, 2944, 32, 1, True) == 4
    assert chunked_segments(2, 2048, 2944, 32, 1, True) == 8  # 184 warps: busy
    assert chunked_segments(8, 2048, 4096, 32, 1, True) == 8  # 1024 warps: 17 for 16896, capped
    assert chunked_segments(8, 2048, 4096, 32, 1, True, busy_max_segments=16) == 16
    assert chunked_segments(64, 2048, 4096, 32, 1, True) == 3
    assert chunked_segments(512, 2048, 4096, 32, 1, True) == 1
    assert chunked_segments(1, 2048, 2944, 32, 1, True, warps_per_scheduler=8, max_segments=64, min_steps=32) == 46
    assert chunked_segments(1, 2048, 2944, 32, 1, False) == 2  # the interpreter: one or two

