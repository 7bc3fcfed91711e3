"""GPTQ of a stack of matrices in one column loop: each slice comes out exactly as GPTQ of that matrix alone
(codes equal, group parameters equal), with its own dead inputs and damping; a matrix whose Hessian cannot be
factored gets ``None`` without disturbing the others."""

import pytest
import torch

from qmamba.calib.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batched
from qmamba.quant.formats import Int4Format, Int8Format


def hessian_of(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def stack_problem(n_mat, n, k, seed=0, dead_col=None):
    """``n_mat`` weight matrices ``[n, k]`` and Hessians of differently correlated, differently scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_mat, n, k, generator=g)
    Hs = []
    for e in range(n_mat):
        mix = torch.randn(k, k, generator=g) / k ** 0.5
        x = (torch.randn(2 * k, k, generator=g) @ mix) * torch.exp(torch.randn(k, generator=g))
        if dead_col is not None and e % 2 == 0:
            x[:, dead_col] = 0
        Hs.append(hessian_of(x))
    return W, torch.stack(Hs)


def assert_slice_matches(batched, single):
    q, s, z = batched
    q1, s1, z1 = single
    assert q.dtype == q1.dtype and torch.equal(q, q1)
    torch.testing.assert_close(s, s1, rtol=0, atol=0)
    assert (z is None) == (z1 is None)
    if z is not None:
        torch.testing.assert_close(z, z1, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,n,k,block", [
    (Int4Format(32), 24, 96, 32),      # ragged lazy blocks: 96 = 3 x 32, groups inside blocks
    (Int4Format(64, True), 20, 96, 40),  # symmetric; a group straddles two lazy blocks; partial last group
    (Int4Format(128), 12, 1472, 128),  # K of BlackMamba's expert fc2 input, not a multiple of 128
    (Int8Format(), 16, 200, 64),       # one group per row
], ids=lambda v: v.describe() if hasattr(v, "describe") else str(v))
@pytest.mark.parametrize("act_order", [False, True])
def test_each_slice_equals_its_own_gptq(fmt, n, k, block, act_order):
    W, H = stack_problem(4, n, k, seed=k + n)
    solved = gptq_quantize_batched(W, H, fmt, block_size=block, act_order=act_order)
    assert len(solved) == 4
    for e in range(4):
        assert_slice_matches(solved[e], gptq_quantize(W[e], H[e], fmt, block_size=block, act_order=act_order))


def test_dead_inputs_are_per_matrix():
    fmt = Int4Format(32)
    W, H = stack_problem(3, 16, 96, seed=5, dead_col=7)  # matrices 0 and 2 have input 7 dead, matrix 1 not
    solved = gptq_quantize_batched(W, H, fmt, block_size=32)
    for e in range(3):
        assert_slice_matches(solved[e], gptq_quantize(W[e], H[e], fmt, block_size=32))
        W_hat = fmt.dequantize_codes(*solved[e])
        assert torch.isfinite(W_hat).all()
        assert torch.equal(W_hat[:, 7], torch.zeros(16)) == (e != 1)  # zeroed where dead only


@pytest.mark.parametrize("bad_hessian", ["zeros", "negative"])
def test_a_failing_matrix_gets_none_and_the_others_match(bad_hessian):
    fmt = Int4Format(32)
    W, H = stack_problem(4, 16, 64, seed=9)
    H[2] = torch.zeros(64, 64) if bad_hessian == "zeros" else -torch.eye(64)
    solved = gptq_quantize_batched(W, H, fmt, block_size=32)
    if bad_hessian == "zeros":  # every input dead: H becomes the identity and the matrix is all zeros
        assert solved[2] is not None and torch.equal(fmt.dequantize_codes(*solved[2]), torch.zeros(16, 64))
    else:
        assert solved[2] is None
    for e in (0, 1, 3):
        assert_slice_matches(solved[e], gptq_quantize(W[e], H[e], fmt, block_size=32))


def test_all_failing_matrices_give_all_none():
    W = torch.randn(2, 8, 32)
    H = -torch.eye(32).expand(2, 32, 32)
    assert gptq_quantize_batched(W, H, Int8Format()) == [None, None]
