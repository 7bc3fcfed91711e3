"""Fused top-1 MoE against the PyTorch reference: all tokens on one expert, every expert used, an expert with no
tokens; decode (per-expert programs) and prefill (grouped tiles); float, int8 and int4 stacks; the routing kernel
that also writes the W4A8 GEMM's int8 rows, bit for bit the quantizer's."""

import pytest
import torch

from qmamba.kernels.activations import ACTIVATION_IDS
from qmamba.kernels.fused_moe import (gated_act, gated_act_ref, moe_forward, moe_forward_ref,
                                      route_top1, route_top1_ref)
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.formats import Int4Format, Int8Format

E, D, FFN = 4, 40, 24


def experts(kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    fc1 = torch.randn(E, 2 * FFN, D, generator=g) / D ** 0.5
    fc2 = torch.randn(E, D, FFN, generator=g) / FFN ** 0.5
    if kind == "float":
        return PackedWeight.from_float(fc1.to(device)), PackedWeight.from_float(fc2.to(device))
    fmt = Int8Format() if kind == "int8" else Int4Format(16)
    pack = lambda w: {k: t.to(device) for k, t in fmt.quantize_rtn(w).items()}  # noqa: E731
    return fmt.kernel_weight(pack(fc1), 2 * FFN, D), fmt.kernel_weight(pack(fc2), D, FFN)


def router_for(assign, device):
    """A router whose bias forces the given expert choice pattern (None: random routing)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(E, D, generator=g).to(device) * 0.1
    b = torch.zeros(E, device=device)
    if assign is not None:
        b[:] = -20.0
        b[assign] = 20.0
    return w, b


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 7, 50])
@pytest.mark.parametrize("routing", ["one_expert", "random"])
def test_moe_matches_reference(kind, tokens, routing, device):
    fc1, fc2 = experts(kind, device)
    rw, rb = router_for(2 if routing == "one_expert" else None, device)
    x = torch.randn(tokens, D, device=device)
    idx, _ = route_top1_ref(x, rw, rb)
    if routing == "one_expert":
        assert (idx == 2).all()
    out = moe_forward(x, rw, rb, fc1, fc2, "gelu", True)
    torch.testing.assert_close(out, moe_forward_ref(x, rw, rb, fc1, fc2, "gelu", True), atol=1e-4, rtol=1e-4)


def test_every_expert_used_and_one_idle(device):
    fc1, fc2 = experts("int4", device)
    g = torch.Generator().manual_seed(5)
    rw = torch.randn(E, D, generator=g).to(device)
    rb = torch.tensor([0.0, -50.0, 0.0, 0.0], device=device)  # expert 1 never wins
    x = torch.randn(60, D, generator=g).to(device)
    idx, _ = route_top1_ref(x, rw, rb)
    assert set(idx.tolist()) == {0, 2, 3}
    for t in (60, 9):  # prefill tiles and decode path
        torch.testing.assert_close(moe_forward(x[:t], rw, rb, fc1, fc2, "silu", True),
                                   moe_forward_ref(x[:t], rw, rb, fc1, fc2, "silu", True), atol=1e-4, rtol=1e-4)
    rw2, rb2 = router_for(None, device)
    xs = torch.randn(200, D, device=device)
    assert set(route_top1_ref(xs, rw2, rb2)[0].tolist()) == set(range(E))
    torch.testing.assert_close(moe_forward(xs, rw2, rb2, fc1, fc2, "gelu", True),
                               moe_forward_ref(xs, rw2, rb2, fc1, fc2, "gelu", True), atol=1e-4, rtol=1e-4)


def test_routing_kernel(device):
    x = torch.randn(33, D, device=device)
    rw, rb = router_for(None, device)
    idx, w = route_top1(x, rw, rb)
    idx_ref, w_ref = route_top1_ref(x, rw, rb)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("activation", sorted(ACTIVATION_IDS))
@pytest.mark.parametrize("gated", [True, False])
def test_gated_activation(activation, gated, device):
    h = torch.randn(5, 2 * FFN, device=device) * 3
    torch.testing.assert_close(gated_act(h, activation, gated), gated_act_ref(h, activation, gated),
                               atol=1e-5, rtol=1e-5)


def _plane_experts(device, n=2 * 48, k=256, seed=3):
    """An int4 g128 fc1 stack held as plane words (as ``load_model`` holds int4 on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    fmt = Int4Format(128)
    w = torch.randn(E, n, k, generator=g) / k ** 0.5
    return fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k).to_planes()


@pytest.mark.parametrize("kind", ["float", "int8", "int4", "int4_planes"])
@pytest.mark.parametrize("activation", sorted(ACTIVATION_IDS))
def test_gated_epilogue_matches_reference(kind, activation, device):
    """``dequant_matmul(..., gate=act)`` over expert tiles (the prefill's grouped fc1 GEMM with the gated activation
    in its epilogue, ``MatmulPolicy.gemm_gated_act``) equals ``act(h[:, :F]) * h[:, F:]`` of the reference matmul,
    with a bias and a per-row scale; the output's F columns span several tiles (ragged last one)."""
    from qmamba.kernels.quant_matmul import dequant_matmul, dequant_matmul_ref
    from qmamba.kernels.routing import expert_tile_map

    fc1 = _plane_experts(device) if kind == "int4_planes" else experts(kind, device)[0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(70, fc1.k, generator=g).to(device)
    dtype = torch.bfloat16 if kind == "int4_planes" and device.type == "cuda" else torch.float32
    x = x.to(dtype)
    idx = torch.randint(0, E, (70,), generator=g).to(device=device, dtype=torch.int32)
    bias = torch.randn(fc1.n, generator=g).to(device)
    scale = torch.rand(70, generator=g).to(device)
    tiles = expert_tile_map(idx, E, 32)
    got = dequant_matmul(x, fc1, bias, row_expert=idx, row_scale=scale, tiles=tiles, gate=activation)
    h = dequant_matmul_ref(x.float(), fc1, bias, row_expert=idx)
    ref = gated_act_ref(h, activation, True) * scale[:, None]
    assert got.shape == (70, fc1.n // 2) and got.dtype == dtype
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.float(), ref, **tol)
    with pytest.raises(ValueError, match="expert tiles"):
        dequant_matmul(x, fc1, row_expert=idx, gate=activation)


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_moe_with_gated_epilogue(kind, device):
    """The MoE prefill with ``MatmulPolicy.gemm_gated_act`` (fc1's epilogue instead of the elementwise kernel)
    matches the reference; decode-sized batches keep the elementwise kernel."""
    import dataclasses

    from qmamba.kernels.matmul_configs import current_policy, using_policy

    fc1, fc2 = experts(kind, device)
    rw, rb = router_for(None, device)
    x = torch.randn(50, D, device=device)
    with using_policy(dataclasses.replace(current_policy(), gemm_gated_act=True)):
        for t in (50, 7):
            torch.testing.assert_close(moe_forward(x[:t], rw, rb, fc1, fc2, "silu", True),
                                       moe_forward_ref(x[:t], rw, rb, fc1, fc2, "silu", True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,k_pad,dtype", [(200, 256, torch.float32), (300, 384, torch.float32),
                                           (256, 256, torch.float32), (200, 384, torch.float32),
                                           (300, 384, torch.bfloat16)])
@pytest.mark.parametrize("bias", [False, True])
def test_routing_kernel_quantizes_the_rows(k, k_pad, dtype, bias, device):
    """:func:`route_top1_int8` (the routing kernel writing the int8 rows too, the W4A8 MoE prefill's fc1 input):
    codes, scales and tile sums equal to the quantizer's twin bit for bit (ragged K, K a multiple of 128, padding
    tiles beyond K, an all-zero row; several 128-column chunks a row), the routing equal to :func:`route_top1`'s
    bit for bit."""
    from qmamba.kernels.fused_moe import route_top1_int8
    from qmamba.kernels.w4a8_gemm import quantize_rows_int8, quantize_rows_int8_ref

    g = torch.Generator().manual_seed(k + k_pad)
    x = (torch.randn(37, k, generator=g) * 3).to(device=device, dtype=dtype)
    x[4] = 0
    x[9, 17] = -50.0  # a row's amax at a negative value
    rw = (torch.randn(5, k, generator=g) * 0.1).to(device=device, dtype=dtype)
    rb = torch.randn(5, generator=g).to(device) if bias else None
    idx, weight, (codes, scale, sums) = route_top1_int8(x, rw, rb, k_pad)
    idx_plain, weight_plain = route_top1(x, rw, rb)
    assert torch.equal(idx, idx_plain) and torch.equal(weight, weight_plain)
    assert len(set(idx.tolist())) > 1  # the rows are routed apart
    ref = quantize_rows_int8_ref(x, k_pad)
    for got, want in zip((codes, scale, sums), ref):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for got, want in zip((codes, scale, sums), quantize_rows_int8(x, k_pad)):  # the standalone launch's
        assert torch.equal(got, want)
    assert scale[4] == 1 and not codes[4].any() and codes.abs().max() == 127


def test_routing_kernel_quantizing_refuses_a_bad_k_pad_and_takes_no_rows(device):
    from qmamba.kernels.fused_moe import route_top1_int8

    rw, rb = router_for(None, device)
    with pytest.raises(ValueError, match="k_pad"):
        route_top1_int8(torch.randn(3, D, device=device), rw, rb, 100)
    idx, weight, (codes, scale, sums) = route_top1_int8(torch.randn(0, D, device=device), rw, rb, 128)
    assert idx.shape == (0,) and codes.shape == (0, 128) and scale.shape == (0,) and sums.shape == (0, 16)
