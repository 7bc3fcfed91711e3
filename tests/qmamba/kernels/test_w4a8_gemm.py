"""The W4A8 GEMM: the activation quantizer against its twin, the GEMM against the dequantized activation times the
dequantized weight (one matrix, routed expert tiles, ragged K, a group of 256, bias; as ``x W^T`` and ``W x^T``; fc1's
gated epilogue), the MoE and the matmul entry point under the policy (fc1's input quantized by the MoE's routing
kernel, bit for bit as by the matmul), the plane-byte order as a permutation, and bad input refused."""

import dataclasses

import pytest
import torch

from qmamba.kernels.fused_moe import _tile_rows, gated_act_ref, moe_forward, moe_forward_ref, route_top1_ref
from qmamba.kernels.matmul_configs import MatmulPolicy, using_policy
from qmamba.kernels.quant_matmul import dequant_matmul, dequant_matmul_ref
from qmamba.kernels.routing import expert_tile_map
from qmamba.kernels.w4a8_gemm import (dequantize_rows_int8, int8_rounded_ref, quantize_rows_int8,
                                      quantize_rows_int8_ref, sum_columns, w4a8_gemm, w4a8_gemm_ref)
from qmamba.quant.formats import Int4Format
from qmamba.quant.layout import int8_x_plane_order


def planes_weight(n, k, device, experts=1, group=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = Int4Format(group)
    w = torch.randn(experts, n, k, generator=g) / k ** 0.5
    packed = fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)
    return packed.to_planes()


def test_plane_byte_order_is_a_permutation_matching_the_plane_words():
    order = int8_x_plane_order(256)
    assert sorted(order.tolist()) == list(range(256))
    # byte 4 w + c of a tile's plane words holds nibbles 2c (low: k = 32 c + w) and 2c + 1 (high: k + 16)
    w = planes_weight(3, 256, "cpu")
    words = w.qweight[0]                                                         # [N, 32] int32
    nib = (words.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 0xF       # [N, 32, 8]
    by_k = torch.empty(3, 256, dtype=torch.int64)
    for t in range(2):
        for i in range(8):
            by_k[:, 128 * t + 16 * i:128 * t + 16 * i + 16] = nib[:, 16 * t:16 * t + 16, i]
    as_bytes = words.contiguous().view(torch.uint8).reshape(3, 2, 64).to(torch.int64)
    low, high = as_bytes & 0xF, as_bytes >> 4
    for t in range(2):
        assert torch.equal(low[:, t], by_k[:, order[128 * t:128 * t + 64]])
        assert torch.equal(high[:, t], by_k[:, order[128 * t + 64:128 * t + 128]])


@pytest.mark.parametrize("m,k,dtype", [(1, 128, torch.float32), (7, 200, torch.float32), (33, 300, torch.float32),
                                       (96, 1472, torch.bfloat16)])
def test_quantize_rows_matches_twin(m, k, dtype, device):
    """Codes equal to the twin's, bit for bit (on CUDA too: the twin divides as the kernel does, with one rounding;
    a tensor over a Python number there multiplies by the reciprocal, which moved codes of BlackMamba-2.8B's
    inputs by one in session 40)."""
    x = (torch.randn(m, k, device=device) * 3).to(dtype)
    x[0, :] = 0  # an all-zero row: scale 1, codes 0
    k_pad = -(-k // 128) * 128
    got = quantize_rows_int8(x, k_pad)
    ref = quantize_rows_int8_ref(x, k_pad)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)
    assert torch.equal(got[2], ref[2])
    # a tile's codes are permuted within the tile: their sums are the tiles' sums, then zeros
    tile_sums = got[0].float().reshape(m, -1, 128).sum(-1)
    assert got[2].shape == (m, sum_columns(k_pad))
    assert torch.equal(got[2][:, :tile_sums.shape[1]], tile_sums) and not got[2][:, tile_sums.shape[1]:].any()
    # the codes are the row's values over its scale, rounded: within half a step of x
    back = dequantize_rows_int8(got[0], got[1], k)
    assert ((back - x.float()).abs() <= got[1][:, None] * 0.5 + 1e-6).all()
    assert got[0][:, :].abs().max() <= 127
    # into preallocated buffers (the fused step's), the sums' padding zeroed once: the same three, bit for bit
    out = (torch.full_like(got[0], 5), torch.empty_like(got[1]), torch.zeros_like(got[2]))
    assert all(a is b for a, b in zip(quantize_rows_int8(x, k_pad, out=out), out))
    assert all(torch.equal(a, b) for a, b in zip(out, got))
    with pytest.raises(ValueError, match="out must be"):
        quantize_rows_int8(x, k_pad, out=(out[0], out[1], out[2][:, :1]))


@pytest.mark.parametrize("m,k,n,group,magic,left", [(5, 200, 40, 128, False, False), (37, 300, 130, 128, False, False),
                                                    (19, 256, 24, 256, False, False), (37, 300, 130, 128, True, False),
                                                    (37, 300, 130, 128, False, True), (19, 256, 24, 256, True, True)])
def test_gemm_matches_dequantized(m, k, n, group, magic, left, device):
    """One matrix (``left``: the product taken as ``W x^T``)."""
    w = planes_weight(n, k, device, group=group)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device)
    codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
    got = w4a8_gemm(codes, scale, sums, w, out=torch.empty(m, n, device=device), bias=bias, block_m=16,
                    block_n=32, num_warps=4, num_stages=2, magic=magic, weight_left=left)
    ref = w4a8_gemm_ref(codes, scale, w, bias=bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    # and the product is x @ W_hat up to the activation's rounding
    exact = x @ w.dequantized(torch.float32)[0].t() + bias
    assert (got - exact).norm() / exact.norm() < 2e-2


@pytest.mark.parametrize("left", [False, True])
def test_gemm_on_expert_tiles(left, device):
    m, k, n, experts = 29, 264, 48, 3
    w = planes_weight(n, k, device, experts=experts, seed=1)
    x = torch.randn(m, k, device=device)
    row_expert = torch.randint(0, experts, (m,), generator=torch.Generator().manual_seed(2)).to(device)
    tiles = expert_tile_map(row_expert, experts, 16)
    codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
    row_scale = torch.rand(m, device=device)
    got = w4a8_gemm(codes, scale, sums, w, out=torch.empty(m, n, device=device), tiles=tiles, row_scale=row_scale,
                    block_m=16, block_n=32, num_warps=4, num_stages=2, weight_left=left)
    ref = w4a8_gemm_ref(codes, scale, w, row_expert=row_expert, row_scale=row_scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act,left", [("gelu", False), ("silu", True)])
def test_gated_epilogue_on_expert_tiles(act, left, device):
    """A gated fc1 (2F rows: gate, then up) on routed tiles: ``act(gate) * up`` times the routing weight, into F
    columns, against the dequantized product; F not a multiple of the tile's 16 output columns (a ragged last tile),
    ragged K, bias by weight row."""
    m, k, f, experts = 29, 200, 40, 3
    w = planes_weight(2 * f, k, device, experts=experts, seed=8)
    x = torch.randn(m, k, device=device)
    row_expert = torch.randint(0, experts, (m,), generator=torch.Generator().manual_seed(9)).to(device)
    tiles = expert_tile_map(row_expert, experts, 16)
    codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
    bias, row_scale = torch.randn(2 * f, device=device), torch.rand(m, device=device)
    got = w4a8_gemm(codes, scale, sums, w, out=torch.empty(m, f, device=device), bias=bias, row_scale=row_scale,
                    tiles=tiles, block_m=16, block_n=32, num_warps=4, num_stages=2, gate=act, weight_left=left)
    h = w4a8_gemm_ref(codes, scale, w, bias=bias, row_expert=row_expert)
    ref = gated_act_ref(h, act, True) * row_scale[:, None]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="out must be"):
        w4a8_gemm(codes, scale, sums, w, out=torch.empty(m, 2 * f, device=device), tiles=tiles, block_m=16,
                  gate=act)


def test_bad_input_is_refused():
    w = planes_weight(8, 128, "cpu")
    codes, scale, sums = quantize_rows_int8_ref(torch.randn(2, 128), 128)
    with pytest.raises(ValueError, match="int8"):
        w4a8_gemm(codes.float(), scale, sums, w)
    with pytest.raises(ValueError, match="sums"):
        w4a8_gemm(codes, scale, sums[:, :1], w)
    with pytest.raises(ValueError, match="tile map"):
        w4a8_gemm(codes, scale, sums, planes_weight(8, 128, "cpu", experts=2))
    with pytest.raises(ValueError, match="plane words"):
        w4a8_gemm(codes, scale, sums,
                  Int4Format(128).kernel_weight(Int4Format(128).quantize_rtn(torch.randn(1, 8, 128)), 8, 128))
    with pytest.raises(ValueError, match="k_pad"):
        quantize_rows_int8(torch.randn(2, 200), 128)


def test_eval_emulation_quantizes_int4_inputs():
    """benchmarks/eval_w4a8.py's emulation: inside it an int4 linear multiplies the int8-quantized input (the W4A8
    kernel's product), not with the dense switch off, and leaving the block restores the plain product."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from eval_w4a8 import emulate_w4a8

    from qmamba.quant.modules import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 16, bias=False)
    q4 = QuantLinear.from_linear(lin, Int4Format(128))
    x = torch.randn(3, 5, 256)
    plain = q4(x)
    with emulate_w4a8(dense=True, experts=True):
        emulated = q4(x)
    with emulate_w4a8(dense=False, experts=True):
        dense_off = q4(x)
    torch.testing.assert_close(emulated, q4(int8_rounded_ref(x)))
    assert not torch.equal(emulated, plain)
    assert torch.equal(dense_off, plain) and torch.equal(q4(x), plain)
    codes, scale, _ = quantize_rows_int8_ref(x.reshape(-1, 256), 256)
    torch.testing.assert_close(int8_rounded_ref(x), dequantize_rows_int8(codes, scale, 256).reshape(x.shape))


W4A8_POLICY = MatmulPolicy(w4a8_min_m=8)  # the routed expert stacks
W4A8_ROUTE_QUANTIZES = MatmulPolicy(w4a8_min_m=8, w4a8_route_quantizes=True)  # fc1's input from the routing kernel
W4A8_ALL = MatmulPolicy(w4a8_min_m=8, w4a8_dense=True)  # and the dense matrices


def test_matmul_entry_point_takes_w4a8_by_policy(device):
    """dequant_matmul under ``MatmulPolicy.w4a8_min_m``: from that many rows a routed int4 plane-word stack (with its
    routing weights) multiplies the int8-rounded input, a dense matrix too with ``w4a8_dense``; below the
    threshold, and a dense matrix without ``w4a8_dense``, the input as is."""
    m, k, n, experts = 21, 200, 40, 3
    dense = planes_weight(n, k, device)
    stack = planes_weight(n, k, device, experts=experts, seed=3)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device)
    row_expert = torch.randint(0, experts, (m,), generator=torch.Generator().manual_seed(4)).to(device)
    row_scale = torch.rand(m, device=device)
    with using_policy(W4A8_ALL):
        got = dequant_matmul(x, dense, bias)
        got_small = dequant_matmul(x[:5], dense, bias)  # 5 rows < w4a8_min_m: the usual path
    with using_policy(W4A8_POLICY):
        got_routed = dequant_matmul(x, stack, row_expert=row_expert, row_scale=row_scale)
        got_dense_off = dequant_matmul(x, dense, bias)
    torch.testing.assert_close(got, dequant_matmul_ref(int8_rounded_ref(x), dense, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_routed, dequant_matmul_ref(int8_rounded_ref(x), stack, row_expert=row_expert,
                                                              row_scale=row_scale), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_small, dequant_matmul_ref(x[:5], dense, bias), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, dequant_matmul_ref(x, dense, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_dense_off, dequant_matmul_ref(x, dense, bias), rtol=1e-5, atol=1e-4)


def moe_operands(device, seed, t=40, d=128, f=96, experts=4):
    """``(x [t, d], router_w, fc1, fc2)``: a gated MoE of int4 plane-word experts."""
    g = torch.Generator().manual_seed(seed)
    router_w = torch.randn(experts, d, generator=g).to(device)
    fc1 = planes_weight(2 * f, d, device, experts=experts, seed=seed + 1)
    fc2 = planes_weight(d, f, device, experts=experts, seed=seed + 2)
    return torch.randn(t, d, generator=g).to(device), router_w, fc1, fc2


@pytest.mark.parametrize("gated_epilogue,tile", [(True, (16, 32, 4, 2, True)), (False, (16, 128, 4, 3, False))])
def test_moe_prefill_with_w4a8(gated_epilogue, tile, device):
    """moe_forward under the W4A8 policy: fc1 and fc2 each multiply their int8-rounded input (fc1's gated
    activation in the W4A8 GEMM's epilogue, or by the elementwise kernel with ``gemm_gated_act`` off), on the
    policy's W4A8 tile (its rows also the MoE's rows a tile)."""
    x, router_w, fc1, fc2 = moe_operands(device, 5)
    with using_policy(dataclasses.replace(W4A8_POLICY, gemm_gated_act=gated_epilogue, w4a8_tile=tile)):
        got = moe_forward(x, router_w, None, fc1, fc2, "gelu", True)
        assert _tile_rows(x.shape[0], fc1, x.device) == tile[0]
    idx, weight = route_top1_ref(x, router_w)
    h = dequant_matmul_ref(int8_rounded_ref(x), fc1, row_expert=idx)
    ref = dequant_matmul_ref(int8_rounded_ref(gated_act_ref(h, "gelu", True)), fc2, row_expert=idx, row_scale=weight)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # and not the W4A16 product
    assert not torch.allclose(got, moe_forward_ref(x, router_w, None, fc1, fc2, "gelu", True), rtol=1e-4, atol=1e-4)


def test_policy_refuses_a_negative_threshold_or_a_short_tile():
    with pytest.raises(ValueError, match="w4a8_min_m"):
        MatmulPolicy(w4a8_min_m=-1)
    with pytest.raises(ValueError, match="w4a8_tile"):
        MatmulPolicy(w4a8_tile=(64, 128, 4, 3))


@pytest.mark.parametrize("gated_epilogue,d", [(True, 128), (False, 200)])
def test_moe_prefill_routes_and_quantizes_in_one_launch(gated_epilogue, d, device, monkeypatch):
    """Under the W4A8 policy the MoE prefill's routing kernel also quantizes x (:func:`route_top1_int8`) and fc1's
    W4A8 GEMM multiplies those codes: the output is bit for bit the composition that quantizes fc1's input in the
    matmul (route, tile map, fc1 and fc2 through the matmul entry point), and the standalone quantizer runs once
    (for fc2's input) instead of twice."""
    from qmamba.kernels import fused_moe
    from qmamba.kernels import w4a8_gemm as wg
    from qmamba.kernels.fused_moe import gated_act, route_top1

    x, router_w, fc1, fc2 = moe_operands(device, 11, t=45, d=d)
    router_b = torch.randn(router_w.shape[0], generator=torch.Generator().manual_seed(12)).to(device)
    calls = {"quantize": 0, "fused": 0}
    real_quantize, real_fused = wg.quantize_rows_int8, fused_moe.route_top1_int8

    def quantize(*args, **kwargs):
        calls["quantize"] += 1
        return real_quantize(*args, **kwargs)

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(wg, "quantize_rows_int8", quantize)
    monkeypatch.setattr(fused_moe, "route_top1_int8", fused)
    policy = dataclasses.replace(W4A8_ROUTE_QUANTIZES, gemm_gated_act=gated_epilogue, w4a8_tile=(16, 32, 4, 2, True))
    with using_policy(policy):
        got = moe_forward(x, router_w, router_b, fc1, fc2, "silu", True)
        assert calls == {"quantize": 1, "fused": 1}
        idx, weight = route_top1(x, router_w, router_b)  # the flow without the fused quantization
        tiles = expert_tile_map(idx, fc1.n_experts, _tile_rows(x.shape[0], fc1, x.device))
        if gated_epilogue:
            a = dequant_matmul(x, fc1, row_expert=idx, tiles=tiles, gate="silu")
        else:
            a = gated_act(dequant_matmul(x, fc1, row_expert=idx, tiles=tiles), "silu", True)
        unfused = dequant_matmul(a, fc2, row_expert=idx, row_scale=weight, tiles=tiles)
        assert calls == {"quantize": 3, "fused": 1}
    assert torch.equal(got, unfused)


def test_moe_fuses_the_quantization_only_where_fc1_takes_w4a8(device, monkeypatch):
    """No fused quantization in decode (T <= 16, even where the policy's threshold is lower), nor where fc1 stays
    on the default route (the default policy; an int4 stack in MatMulNBits layout, not plane words), nor with
    ``MatmulPolicy.w4a8_route_quantizes`` off."""
    from qmamba.kernels import fused_moe

    x, router_w, fc1, fc2 = moe_operands(device, 13)
    fused = []
    real = fused_moe.route_top1_int8
    monkeypatch.setattr(fused_moe, "route_top1_int8", lambda *a: fused.append(a[0].shape[0]) or real(*a))
    fmt = Int4Format(128)
    g = torch.Generator().manual_seed(14)
    packed = fmt.quantize_rtn(torch.randn(4, fc1.n, fc1.k, generator=g))
    nbits = fmt.kernel_weight({key: t.to(device) for key, t in packed.items()}, fc1.n, fc1.k)
    with using_policy(W4A8_ROUTE_QUANTIZES):
        moe_forward(x[:9], router_w, None, fc1, fc2, "gelu", True)  # decode
        moe_forward(x, router_w, None, nbits, fc2, "gelu", True)  # fc1 not plane words
        assert not fused
        moe_forward(x, router_w, None, fc1, fc2, "gelu", True)
        assert fused == [x.shape[0]]
    moe_forward(x, router_w, None, fc1, fc2, "gelu", True)  # the default policy
    with using_policy(W4A8_POLICY):  # W4A8 with w4a8_route_quantizes off (its default): fc1 quantizes its own input
        moe_forward(x, router_w, None, fc1, fc2, "gelu", True)
    assert fused == [x.shape[0]]


def test_bad_pre_quantized_input_is_refused(device):
    """``x_int8`` of the matmul entry point: refused where the call does not take the W4A8 path, and when its codes,
    scale or sums do not fit x and the weight."""
    m, k, n, experts = 21, 200, 40, 3
    stack = planes_weight(n, k, device, experts=experts, seed=3)
    x = torch.randn(m, k, device=device)
    row_expert = torch.randint(0, experts, (m,), generator=torch.Generator().manual_seed(4)).to(device)
    codes, scale, sums = quantize_rows_int8(x, 256)
    with using_policy(W4A8_POLICY):
        got = dequant_matmul(x, stack, row_expert=row_expert, x_int8=(codes, scale, sums))
        assert torch.equal(got, dequant_matmul(x, stack, row_expert=row_expert))
        bad = {"codes' rows": (codes[:-1], scale, sums), "codes' width": (codes[:, :128].contiguous(), scale, sums),
               "codes' dtype": (codes.float(), scale, sums), "scale's shape": (codes, scale[:, None], sums),
               "scale's dtype": (codes, scale.double(), sums), "sums' width": (codes, scale, sums[:, :8]),
               "sums' dtype": (codes, scale, sums.to(torch.int32)), "not a triple": (codes, scale)}
        for what, x_int8 in bad.items():
            with pytest.raises(ValueError):
                dequant_matmul(x, stack, row_expert=row_expert, x_int8=x_int8)
                pytest.fail(f"{what} accepted")
        with pytest.raises(ValueError, match="W4A8"):  # below the policy's threshold
            dequant_matmul(x[:5], stack, row_expert=row_expert[:5], x_int8=quantize_rows_int8(x[:5], 256))
    with pytest.raises(ValueError, match="W4A8"):  # the default policy
        dequant_matmul(x, stack, row_expert=row_expert, x_int8=(codes, scale, sums))
