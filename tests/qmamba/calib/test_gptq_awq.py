"""The algorithms on single matrices with correlated inputs: GPTQ and AWQ beat RTN on the output error they
optimise; the limiting cases reduce to RTN; degenerate inputs stay finite."""

import pytest
import torch

from qmamba.calib.awq import quantize_with_clip, search_clip, search_scale
from qmamba.calib.gptq import HessianAccumulator, gptq_quantize
from qmamba.quant.formats import Int4Format, Int8Format


def correlated_inputs(t, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    scales = torch.exp(torch.randn(k, generator=g))  # outlier channels
    return (torch.randn(t, k, generator=g) @ mix + 0.1 * torch.randn(t, k, generator=g)) * scales


def output_error(x, W, W_hat):
    return float((x @ W.T - x @ W_hat.T).pow(2).sum() / (x @ W.T).pow(2).sum())


@pytest.mark.parametrize("fmt", [Int4Format(32), Int4Format(64, True), Int8Format()], ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(fmt, act_order):
    torch.manual_seed(0)
    k = 96  # not a multiple of 64: a partial last group
    W = torch.randn(40, k)
    x = correlated_inputs(2000, k)
    acc = HessianAccumulator(k)
    acc.add(x[:1000])
    acc.add(x[1000:])
    torch.testing.assert_close(acc.hessian(), 2 * x.T @ x / 2000, rtol=1e-4, atol=1e-4)
    q, s, z = gptq_quantize(W, acc.hessian(), fmt, block_size=32, act_order=act_order)
    W_gptq = fmt.dequantize_codes(q, s, z)
    # the codes pack exactly
    assert torch.equal(fmt.dequantize(fmt.from_codes(q, s, z), k), W_gptq)
    W_rtn = fmt.fake_quantize(W)
    assert output_error(x, W, W_gptq) < 0.9 * output_error(x, W, W_rtn)


def test_gptq_dead_inputs_and_few_tokens_stay_finite():
    fmt = Int4Format(32)
    W = torch.randn(16, 64)
    x = torch.randn(5, 64)  # rank-deficient Hessian
    x[:, 7] = 0  # a dead input
    acc = HessianAccumulator(64)
    acc.add(x)
    q, s, z = gptq_quantize(W, acc.hessian(), fmt)
    W_hat = fmt.dequantize_codes(q, s, z)
    assert torch.isfinite(W_hat).all()
    assert torch.equal(W_hat[:, 7], torch.zeros(16))  # a dead column is zeroed before quantization


def test_awq_scale_never_worse_than_rtn_and_clip_one_is_rtn():
    fmt = Int4Format(32)
    torch.manual_seed(3)
    W = torch.randn(48, 64)
    x = correlated_inputs(1500, 64, seed=3)
    s, alpha, rel_err = search_scale([(W, x)], x.abs().mean(0), fmt, n_grid=20)
    rtn_err = output_error(x, W, fmt.fake_quantize(W))
    assert rel_err <= rtn_err + 1e-9
    assert 0.0 <= alpha < 1.0 and s.shape == (64,)
    # clipping search: ratio 1 everywhere reproduces RTN; the searched clip does not increase group errors
    ones = torch.ones(48, 2)
    q, sc, zp = quantize_with_clip(W, ones, fmt)
    assert torch.equal(fmt.dequantize_codes(q, sc, zp), fmt.fake_quantize(W))
    Ws, xs = W * s, x / s
    clip = search_clip(Ws, xs, fmt, n_grid=20)
    assert clip.shape == (48, 2) and bool((clip <= 1).all()) and bool((clip >= 0.5).all())
    q, sc, zp = quantize_with_clip(Ws, clip, fmt)
    awq_err = output_error(xs, Ws, fmt.dequantize_codes(q, sc, zp))
    assert awq_err < rtn_err


def test_awq_shared_scale_sums_over_experts():
    """One scale for several experts, each on its own tokens: recomputed here for every alpha of the grid, the
    chosen alpha has the smallest output error summed over the experts, and that relative error is the one
    returned; its scale is ``mean|x|^alpha``, normalised."""
    fmt = Int4Format(32)
    torch.manual_seed(5)
    pairs = [(torch.randn(16, 64), correlated_inputs(300, 64, seed=e)) for e in range(3)]
    x_mean = torch.cat([x for _, x in pairs]).abs().mean(0)
    s, alpha, err = search_scale(pairs, x_mean, fmt, n_grid=10)

    def scale_for(a):
        raw = x_mean.clamp(min=1e-4) ** a
        return (raw / (raw.max() * raw.min()).sqrt()).clamp(min=1e-4)

    energy = sum(float((x @ W.T).pow(2).sum()) for W, x in pairs)
    summed = {i / 10: sum(float(((x / scale_for(i / 10)) @ fmt.fake_quantize(W * scale_for(i / 10)).T
                                 - x @ W.T).pow(2).sum()) for W, x in pairs) / energy for i in range(10)}
    assert alpha == min(summed, key=summed.get)
    assert err == pytest.approx(summed[alpha], rel=1e-4)
    torch.testing.assert_close(s, scale_for(alpha))
    assert err < summed[0.0]  # better than plain RTN (alpha 0) on these outlier channels
