"""The few-row W4A8 kernel (dp4a, a program a row) against the dequantized activation times the dequantized weight:
one matrix and routed expert rows, ragged K, a group of 256, bias, the gated epilogue with routing weights; bad input
refused."""

import pytest
import torch

from qmamba.kernels.decode_step import add_norm_ref
from qmamba.kernels.fused_moe import gated_act_ref
from qmamba.kernels.row_norm import RowAddNorm
from qmamba.kernels.w4a8_gemm import quantize_rows_int8, quantize_rows_int8_ref, w4a8_gemm_ref
from qmamba.kernels.w4a8_rows import w4a8_rows
from qmamba.quant.formats import Int4Format
from qmamba.quant.layout import int4_x_planes, int4_x_planes_width


def planes_weight(n, k, device, experts=1, group=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = Int4Format(group)
    w = torch.randn(experts, n, k, generator=g) / k ** 0.5
    w[..., 0, :] *= 4  # a row of larger codes and zero points than the rest
    packed = fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)
    return packed.to_planes()


@pytest.mark.parametrize("m,k,n,group,block_n,chunk", [(1, 200, 40, 128, 16, 1), (8, 300, 70, 128, 32, 1),
                                                       (3, 512, 24, 256, 8, 1), (2, 300, 40, 128, 16, 2),
                                                       (3, 640, 24, 256, 8, 4), (2, 200, 24, 128, 8, 8)])
def test_rows_match_dequantized(m, k, n, group, block_n, chunk, device):
    """Any number of 128-column tiles a step of the K loop (``chunk``), a last step with fewer tiles than that
    included (K = 300: 3 tiles by 2; 640: 5 by 4; 200: 2 by 8), N not a multiple of the block's rows (70 by 32)."""
    w = planes_weight(n, k, device, group=group)
    x = torch.randn(m, k, device=device) * 2
    bias = torch.randn(n, device=device)
    codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
    got = w4a8_rows(codes, scale, sums, w, out=torch.empty(m, n, device=device), bias=bias, block_n=block_n,
                    chunk=chunk)
    torch.testing.assert_close(got, w4a8_gemm_ref(codes, scale, w, bias=bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gate,chunk", [(None, 1), ("silu", 1), (None, 2), ("silu", 4)])
def test_routed_rows(gate, chunk, device):
    """Rows on their own experts (two rows sharing one), the routing weight, and fc1's gated epilogue (F not a
    multiple of the block's output columns)."""
    m, k, f, experts = 6, 200, 36, 4
    n = 2 * f if gate else f
    w = planes_weight(n, k, device, experts=experts, seed=1)
    x = torch.randn(m, k, device=device)
    row_expert = torch.tensor([2, 0, 3, 2, 1, 3], dtype=torch.int32, device=device)
    row_scale = torch.rand(m, device=device) + 0.5
    codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
    got = w4a8_rows(codes, scale, sums, w, out=torch.empty(m, f, device=device), row_expert=row_expert,
                    row_scale=row_scale, gate=gate, block_n=16, chunk=chunk)
    h = w4a8_gemm_ref(codes, scale, w, row_expert=row_expert)
    ref = (gated_act_ref(h, gate, True) if gate else h) * row_scale[:, None]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("word_sums", [False, True])
def test_gated_rows_write_the_planes_of_their_output(word_sums, device):
    """The fused step's fc1 (expert read after the wait, ``expert_ready=False``): its gated output's int4 input
    planes 0..7 as stored, and their word sums where asked, as the decode kernels' epilogue writes them for fc2."""
    m, k, f, experts = 3, 256, 150, 3
    w = planes_weight(2 * f, k, device, experts=experts, seed=2)
    x = torch.randn(m, k, device=device)
    row_expert = torch.tensor([2, 0, 2], dtype=torch.int32, device=device)
    codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
    width = int4_x_planes_width(f)
    planes = torch.zeros(m, 9, width, device=device)
    wsums = torch.zeros(m, width // 8, device=device) if word_sums else None
    act = w4a8_rows(codes, scale, sums, w, out=torch.full((m, f), float("nan"), device=device), row_expert=row_expert,
                    gate="silu", block_n=32, expert_ready=False, out_planes=planes, out_word_sums=wsums)
    want = gated_act_ref(w4a8_gemm_ref(codes, scale, w, row_expert=row_expert), "silu", True)
    torch.testing.assert_close(act, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(planes[:, :8], int4_x_planes(act)[:, :8], atol=0, rtol=0)  # of the stored values
    assert torch.equal(planes[:, 8], torch.zeros_like(planes[:, 8]))  # plane 8 is left to the sums' row
    if word_sums:
        torch.testing.assert_close(wsums, int4_x_planes(act)[:, 8, :width // 8], atol=1e-22, rtol=1e-5)
    with pytest.raises(ValueError, match="out_planes"):
        w4a8_rows(codes, scale, sums, w, row_expert=row_expert, gate="silu", out_planes=planes[:, :, :128])
    with pytest.raises(ValueError, match="planes"):
        w4a8_rows(codes, scale, sums, w, row_expert=row_expert, gate="silu",
                  out_word_sums=torch.zeros(m, width // 8, device=device))


def test_bad_input_is_refused():
    w = planes_weight(8, 128, "cpu")
    codes, scale, sums = quantize_rows_int8_ref(torch.randn(2, 128), 128)
    with pytest.raises(ValueError, match="int8"):
        w4a8_rows(codes.float(), scale, sums, w)
    with pytest.raises(ValueError, match="sums"):
        w4a8_rows(codes, scale, sums[:, :1], w)
    with pytest.raises(ValueError, match="row_expert"):
        w4a8_rows(codes, scale, sums, planes_weight(8, 128, "cpu", experts=2))
    with pytest.raises(ValueError, match="out must be"):
        w4a8_rows(codes, scale, sums, w, out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="chunk"):
        w4a8_rows(codes, scale, sums, w, chunk=3)


@pytest.mark.parametrize("layernorm,chunk", [(False, 1), (False, 8), (True, 2)])
def test_last_program_of_a_row_ends_it_with_the_add_and_norm(layernorm, chunk, device):
    """``out_norm``: as the fused step's fc2 (the routing weight in the epilogue), the last of a row's programs to
    finish adds the stored row into the residual and writes its norm (RMSNorm, or LayerNorm with a bias) into
    ``x_out``, as :func:`add_norm_ref` computes them from the stored output; 150 columns (not a power of two) over
    10 programs a row; the counter back at zero, so a second call on other inputs is right too."""
    m, k, d, experts = 3, 256, 150, 3
    w = planes_weight(d, k, device, experts=experts, seed=5)
    row_expert = torch.tensor([2, 0, 2], dtype=torch.int32, device=device)
    row_scale = torch.rand(m, device=device) + 0.5
    norm_w = torch.randn(d, device=device)
    norm_b = torch.randn(d, device=device) if layernorm else None
    residual = torch.randn(m, d, device=device)
    x_out = torch.full((m, d), 7.0, device=device, dtype=torch.bfloat16)
    counter = torch.zeros(m, dtype=torch.int32, device=device)
    spec = RowAddNorm(residual, norm_w, norm_b, x_out, 1e-5, counter)
    for seed in (0, 1):
        x = torch.randn(m, k, device=device, generator=torch.Generator(device).manual_seed(seed))
        codes, scale, sums = quantize_rows_int8(x, w.qweight.shape[-1] * 8)
        res_before = residual.clone()
        out = w4a8_rows(codes, scale, sums, w, out=torch.empty(m, d, device=device), row_expert=row_expert,
                        row_scale=row_scale, block_n=16, chunk=chunk, out_norm=spec)
        want_res, want_x, _, _ = add_norm_ref(res_before, norm_w, 1e-5, h=out, norm_b=norm_b)
        torch.testing.assert_close(residual, want_res, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x_out.float(), want_x.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
        assert torch.equal(counter, torch.zeros_like(counter))
    with pytest.raises(ValueError, match="counter"):
        w4a8_rows(codes, scale, sums, w, row_expert=row_expert, out_norm=spec._replace(counter=counter[:2]))
    with pytest.raises(ValueError, match="residual"):
        w4a8_rows(codes, scale, sums, w, row_expert=row_expert, out_norm=spec._replace(residual=residual[:, :-1]))
