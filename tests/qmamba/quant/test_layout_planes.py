"""int4 plane words (the decode kernels' view of int4 codes) against the stored layout: element by element through
an independent index formula, round trip back to the stored bytes, and the dequantized weight unchanged."""

import pytest
import torch

from qmamba.kernels.weights import PackedWeight
from qmamba.quant import layout
from qmamba.quant.formats import Int4Format


@pytest.mark.parametrize("k,group", [(1472, 128), (300, 128), (3872, 256), (200, 32), (64, 16)])
def test_plane_words_hold_each_code_where_the_layout_says(k, group):
    torch.manual_seed(k)
    n = 5
    packed = Int4Format(group).quantize_rtn(torch.randn(2, n, k))
    qweight = packed["qweight"]
    words = layout.int4_to_planes(qweight, k)
    n_blocks = qweight.shape[-2]
    tiles = -(-n_blocks * group // 128)
    assert words.shape == (2, n, tiles * 16) and words.dtype == torch.int32
    codes, _ = layout.unpack_int4(qweight, packed["zeros"], k)              # [2, n, k]
    as_unsigned = words.to(torch.int64) % (2 ** 32)
    for kk in torch.randint(0, k, (64,)).tolist() + [0, k - 1]:
        t, i, w = kk // 128, (kk % 128) // 16, kk % 16  # element 128 t + 16 i + w sits in bits 4i.. of word 16 t + w
        nibble = (as_unsigned[..., 16 * t + w] >> (4 * i)) & 0xF
        assert torch.equal(nibble, codes[..., kk].to(torch.int64)), kk
    assert torch.equal(layout.int4_from_planes(words, n_blocks, group), qweight)


def test_packed_weight_plane_form_dequantizes_to_the_same_weight():
    torch.manual_seed(0)
    fmt = Int4Format(128)
    w = fmt.kernel_weight(fmt.quantize_rtn(torch.randn(3, 40, 1472)), 40, 1472)
    planes = w.to_planes()
    assert planes.k_padded == w.k_padded and planes.group_size == 128
    torch.testing.assert_close(planes.dequantized(), w.dequantized(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only int4"):
        PackedWeight.from_float(torch.randn(4, 8)).to_planes()


def test_plane_record_checks_its_tensors():
    from qmamba.quant.layout import LayoutError

    fmt = Int4Format(128)
    planes = fmt.kernel_weight(fmt.quantize_rtn(torch.randn(2, 8, 300)), 8, 300).to_planes()
    packed = {"qweight": planes.qweight, "scales": planes.scales, "zeros": planes.zeros}
    assert PackedWeight.from_int4_planes(packed, 8, 300, 128).n_experts == 2
    with pytest.raises(LayoutError, match="planes qweight"):
        PackedWeight.from_int4_planes({**packed, "qweight": planes.qweight[..., :-16]}, 8, 300, 128)
    with pytest.raises(LayoutError, match="planes scales"):
        PackedWeight.from_int4_planes({**packed, "scales": planes.scales.float()}, 8, 300, 128)
    with pytest.raises(LayoutError, match="multiple of 128"):
        PackedWeight.from_int4_planes(packed, 8, 300, 64)


def test_binary_denorm_vectors_give_the_matmul():
    """The 1-bit "denorm" identity (qmamba.quant.layout): 2^54 * sum_k x_k alpha_denorm_k [bit k read as a float]
    + x . gamma equals x @ W_hat^T, computed here in float64 from the bits themselves."""
    from qmamba.quant.layout import (BINARY_DENORM_HALF, BINARY_DENORM_SUM_SCALE, binary_denorm_vectors,
                                     dequantize_binary, pack_signs, unpack_signs)
    g = torch.Generator().manual_seed(3)
    n, k = 5, 96
    bits = (torch.rand(n, k, generator=g) > 0.5).to(torch.uint8)
    alpha = (torch.rand(k, generator=g) + 0.1).half()
    beta = (torch.randn(k, generator=g) * 0.1).half()
    packed = pack_signs(bits)
    x = torch.randn(2, k, generator=g)
    a_dn, gamma = binary_denorm_vectors(alpha, beta)
    assert a_dn.dtype == gamma.dtype == torch.float32
    t = torch.arange(k) % BINARY_DENORM_HALF
    as_float = unpack_signs(packed, k).double() * torch.exp2(t.double() - 149)  # bit k masked in place, as a float
    got = BINARY_DENORM_SUM_SCALE * (x.double()[:, None, :] * a_dn.double() * as_float).sum(-1) + \
        (x.double() @ gamma.double())[:, None]
    want = x.double() @ dequantize_binary(packed, alpha, beta, k).double().T
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
