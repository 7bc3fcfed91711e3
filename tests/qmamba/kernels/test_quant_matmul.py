"""Dequant matmul (int8, int4 every group size, float stacks) against x @ dequantized W, on the GEMV, small-M
tensor-core and GEMM paths; K not a multiple of the group (padded tail); the custom op and its fake impl."""

import os

import pytest
import torch

from qmamba.kernels.dequantize import dequantize_stack, dequantize_stack_triton
from qmamba.kernels.matmul_configs import GEMV_MAX_M, MatmulConfig, MatmulPolicy, pick_config
from qmamba.kernels.quant_matmul import dequant_matmul, dequant_matmul_ref
from qmamba.kernels.routing import expert_tile_map
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.quant.layout import INT4_GROUP_SIZES

REAL = os.environ.get("QMAMBA_TEST_DEVICE") == "cuda"
FORMATS = [Int8Format()] + [Int4Format(g) for g in INT4_GROUP_SIZES] + [Int4Format(64, symmetric=True)]
M_VALUES = [1, 5, GEMV_MAX_M + 17]  # GEMV, small-M dot, GEMM


def make_weight(fmt, n, k, device, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*lead, n, k, generator=g) / k ** 0.5
    return fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)


def close(got, ref, dtype):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("m", M_VALUES)
def test_dense_matches_dequantized(fmt, m, device):
    n, k = 37, 150  # K = 150: padded to whole groups for every group size
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    w = make_weight(fmt, n, k, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device)
    got = dequant_matmul(x, w, bias)
    ref = (x.float() @ fmt.dequantize({"qweight": w.qweight[0], "scales": w.scales[0],
                                       **({"zeros": w.zeros[0]} if w.zeros is not None else {})}, k).t() + bias)
    assert got.dtype == dtype and got.shape == (m, n)
    close(got, ref, dtype)


def test_split_k_and_explicit_config_agree(device):
    w = make_weight(Int4Format(32), 24, 300, device)
    x = torch.randn(3, 300, device=device)
    ref = dequant_matmul_ref(x, w)
    for cfg in (pick_config(3, w, device),):
        close(dequant_matmul(x, w, config=cfg), ref, torch.float32)
    close(dequant_matmul(x, w, config=MatmulConfig(16, 16, 32, split_k=4, num_warps=1, num_stages=1)), ref,
          torch.float32)
    close(dequant_matmul(x[:1], w, config=MatmulConfig(1, 8, 32, split_k=3, num_warps=1, num_stages=1)),
          ref[:1], torch.float32)


@pytest.mark.parametrize("m,split_k", [(1, 1), (5, 1), (5, 2), (5, 4)])
def test_early_tile_matches(m, split_k, device):
    """``early_tile``: the small-M kernel reads each split's first K tile of int4 plane words before its (PDL) wait;
    ragged K (300: 3 plane tiles) and a split with no tile (4 splits of 3)."""
    n, k = 40, 300
    w = make_weight(Int4Format(128), n, k, device).to_planes()
    x = torch.randn(m, k, device=device)
    ref = dequant_matmul_ref(x, w)
    cfg = MatmulConfig(16 if m > 1 else 1, 16, 128, split_k=split_k, num_warps=1 if device.type != "cuda" else 4,
                       num_stages=1)
    pdl = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    for early in (False, True):
        close(dequant_matmul(x, w, config=cfg, early_tile=early, pdl=pdl), ref, torch.float32)


@pytest.mark.parametrize("sem", ["relaxed", "acq_rel"])
def test_split_k_atomic_orderings_agree(sem, device):
    """``MatmulPolicy.split_k_atomic_sem``: the split-K adds of the tile kernel, the int4 word GEMV and the 1-bit
    word GEMV in either ordering give x @ W_hat^T; an unknown ordering is refused by the policy."""
    import dataclasses

    from qmamba.kernels.binary_matmul import binary_matmul, binary_matmul_ref
    from qmamba.kernels.matmul_configs import DEFAULT_POLICY, BinaryConfig, MatmulPolicy
    from qmamba.quant.formats import BinaryFormat

    policy = dataclasses.replace(DEFAULT_POLICY, split_k_atomic_sem=sem)
    w = make_weight(Int4Format(32), 24, 320, device)
    x = torch.randn(3, 320, device=device)
    ref = dequant_matmul_ref(x, w)
    close(dequant_matmul(x, w, config=MatmulConfig(16, 16, 32, split_k=4, num_warps=1, num_stages=1),
                         policy=policy), ref, torch.float32)
    close(dequant_matmul(x[:1], w, config=MatmulConfig(1, 8, 32, split_k=3, num_warps=1, num_stages=1),
                         policy=policy), ref[:1], torch.float32)
    b = make_weight(BinaryFormat(), 24, 320, device)
    close(binary_matmul(x[:1], b, config=BinaryConfig(1, 8, 64, 1, 1, 3), policy=policy),
          binary_matmul_ref(x[:1], b), torch.float32)
    with pytest.raises(ValueError, match="split_k_atomic_sem"):
        MatmulPolicy(split_k_atomic_sem="seq_cst")


def test_int4_word_gemv_is_a_policy_choice(device, monkeypatch):
    """M = 1 int4 takes the 32-bit-word GEMV by default and the tile kernel under ``MatmulPolicy(int4_word_gemv=
    False)`` (an argument, no module switch); both agree with the reference, routed by expert too."""
    from qmamba.kernels import quant_matmul

    calls = []
    real = quant_matmul.int4_gemv
    monkeypatch.setattr(quant_matmul, "int4_gemv", lambda *a: calls.append(1) or real(*a))
    w = make_weight(Int4Format(64), 40, 256, device, lead=(3,))
    x = torch.randn(1, 256, device=device)
    idx = torch.tensor([2], device=device, dtype=torch.int32)
    ref = dequant_matmul_ref(x, w, row_expert=idx)
    close(dequant_matmul(x, w, row_expert=idx), ref, torch.float32)
    assert len(calls) == 1
    close(dequant_matmul(x, w, row_expert=idx, policy=MatmulPolicy(int4_word_gemv=False)), ref, torch.float32)
    assert len(calls) == 1


def test_float_stack_with_rows_routed(device):
    w = torch.randn(3, 20, 33, device=device)
    pw = PackedWeight.from_float(w)
    for m in (1, 6, 40):
        x = torch.randn(m, 33, device=device)
        idx = torch.randint(0, 3, (m,), device=device, dtype=torch.int32)
        scale = torch.rand(m, device=device)
        ref = torch.einsum("mk,mnk->mn", x, w[idx.long()]) * scale[:, None]
        close(dequant_matmul(x, pw, row_expert=idx, row_scale=scale), ref, torch.float32)


def test_expert_tile_map_covers_every_row_once(device):
    idx = torch.tensor([2, 0, 2, 2, 2, 0, 3, 2, 2], device=device)  # expert 1 has no tokens
    tiles = expert_tile_map(idx, 4, block_m=2)
    seen = []
    for e, lo, hi in zip(tiles.tile_expert.tolist(), tiles.tile_lo.tolist(), tiles.tile_hi.tolist()):
        assert hi - lo <= 2
        rows = tiles.sorted_ids[lo:hi].tolist()
        assert all(int(idx[r]) == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(idx.numel()))


@pytest.mark.skipif(not REAL, reason="real BlackMamba-2.8B shapes on the GPU only")
@pytest.mark.parametrize("n,k", [(5888, 1472), (1472, 2944), (7744, 1472), (1472, 3872), (50304, 1472)])
@pytest.mark.parametrize("m", [1, 8, 16, 100, 300, 600])
def test_real_shapes(n, k, m, device):
    for fmt in (Int8Format(), Int4Format(128)):
        w = make_weight(fmt, n, k, device)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = x.float() @ w.dequantized()[0].t()
        torch.testing.assert_close(dequant_matmul(x, w).float(), ref, atol=5e-2, rtol=5e-2)


def test_custom_op_and_fake(device):
    from qmamba.kernels import custom_ops  # registers the ops

    w = make_weight(Int4Format(16), 10, 40, device)
    x = torch.randn(2, 40, device=device)
    args = (x, *custom_ops.weight_args(w), None)
    assert args[1:5] == (2, 10, 40, 16)  # format id, n, k and the group size travel as they are, not from a shape
    close(torch.ops.qmamba.dequant_matmul(*args), dequant_matmul_ref(x, w), torch.float32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.qmamba.dequant_matmul(*fake_args)
    assert tuple(out.shape) == (2, 10)


@pytest.mark.parametrize("fmt", [Int8Format(), Int4Format(16), Int4Format(128)], ids=lambda f: f.describe())
def test_dequantize_stack_equals_layout_dequantization(fmt, device):
    """The large-M prefill path's one-pass dequantization (PyTorch and Triton twins) equals the layout's."""
    w = make_weight(fmt, 9, 150, device, lead=(2,))
    ref = w.dequantized(torch.float32)
    torch.testing.assert_close(dequantize_stack(w, torch.float32), ref)
    torch.testing.assert_close(dequantize_stack_triton(w, torch.float32, block_r=8, block_k=64), ref)
    torch.testing.assert_close(dequantize_stack_triton(w, torch.float16).float(), ref.half().float())


@pytest.mark.parametrize("fmt,block_k,split_k", [(Int4Format(128), 64, 2), (Int4Format(32), 64, 1),
                                                 (Int8Format(), 32, 3), (Int4Format(64, symmetric=True), 64, 1)],
                         ids=["int4g128-half-group-tiles-splitk", "int4g32-two-groups-per-tile", "int8-splitk",
                              "int4g64-sym"])
def test_gemm_kernel_configs(fmt, block_k, split_k, device):
    """The prefill GEMM kernel with explicit tiles: a group split over two K tiles (scale after the dot), two groups
    in one tile (scale before), split-K atomics, several row tiles (swizzled), bias and a row scale."""
    n, k, m = 40, 300, 50
    w = make_weight(fmt, n, k, device, seed=4)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device)
    rscale = torch.rand(m, device=device)
    ref = dequant_matmul_ref(x, w, bias, row_scale=rscale)
    got = dequant_matmul(x, w, bias, row_scale=rscale,
                         config=MatmulConfig(16, 16, block_k, split_k=split_k, num_warps=1, num_stages=1))
    close(got, ref, torch.float32)


@pytest.mark.parametrize("group", [16, 128])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("groups_per_iter", [1, 2])
def test_int4_word_gemv_dense_and_routed(group, split_k, groups_per_iter, device):
    """M = 1 int4 (the 32-bit-word kernel): dense with bias, and routed to one expert of a stack with a routing
    weight (the other experts' programs must write nothing), with and without split-K, one or two groups per
    iteration (K = 300: a last iteration with a missing group)."""
    fmt = Int4Format(group)
    k, n = 300, 24
    x = torch.randn(1, k, device=device)
    cfg = MatmulConfig(1, 16, group * groups_per_iter, split_k=split_k, num_warps=1, num_stages=1)
    w = make_weight(fmt, n, k, device, seed=5)
    bias = torch.randn(n, device=device)
    close(dequant_matmul(x, w, bias, config=cfg), dequant_matmul_ref(x, w, bias), torch.float32)
    stack = make_weight(fmt, n, k, device, lead=(4,), seed=6)
    idx = torch.tensor([2], dtype=torch.int32, device=device)
    gate = torch.tensor([0.7], device=device)
    ref = dequant_matmul_ref(x, stack, row_expert=idx, row_scale=gate)
    close(dequant_matmul(x, stack, row_expert=idx, row_scale=gate, config=cfg), ref, torch.float32)
