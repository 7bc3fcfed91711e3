"""Exact tier: every format packs and unpacks exactly, in the documented layout (checked by an independent
numpy decoder written from the layout description), including K not a multiple of the group size."""

import numpy as np
import pytest
import torch

from qmamba.errors import ConfigError
from qmamba.quant.formats import FORMATS, Int4Format, Int8Format, format_from_dict, make_format

INT4_CASES = [(g, sym) for g in (32, 64, 128) for sym in (False, True)]


def decode_int4_numpy(qweight, scales, zeros, k):
    """Independent decoder of the MatMulNBits layout: low nibble = even index, zero points packed per row."""
    qw = qweight.numpy()
    n, nb, half = qw.shape
    flat = qw.reshape(n, nb * half)
    codes = np.empty((n, nb * half * 2), dtype=np.int64)
    codes[:, 0::2] = flat & 0xF
    codes[:, 1::2] = flat >> 4
    zp = zeros.numpy()
    zcodes = np.empty((n, zp.shape[1] * 2), dtype=np.int64)
    zcodes[:, 0::2] = zp & 0xF
    zcodes[:, 1::2] = zp >> 4
    g = half * 2
    w = np.empty((n, nb * g), dtype=np.float64)
    for b in range(nb):
        w[:, b * g:(b + 1) * g] = (codes[:, b * g:(b + 1) * g] - zcodes[:, b:b + 1]) * \
            scales.numpy()[:, b:b + 1].astype(np.float64)
    return w[:, :k], codes


@pytest.mark.parametrize("group,sym", INT4_CASES)
@pytest.mark.parametrize("k", [128, 200, 37])
def test_int4_round_trip_exact(group, sym, k):
    torch.manual_seed(k + group)
    fmt = Int4Format(group, sym)
    W = torch.randn(24, k) * torch.rand(24, 1)
    scale, zero = fmt.params(W)
    q = fmt.quantize(W, scale, zero)
    packed = fmt.from_codes(q, scale, zero)
    fmt.check(packed, 24, k)
    # packed -> codes -> packed is the identity
    q2, s2, z2 = fmt.unpack(packed, k)
    assert torch.equal(q2, q) and torch.equal(s2, scale) and torch.equal(z2, zero)
    assert all(torch.equal(packed[n], fmt.from_codes(q2, s2, z2)[n]) for n in packed)
    # dequantization: codes path == packed path == independent decoder, bit for bit
    dense = fmt.dequantize(packed, k)
    assert torch.equal(dense, fmt.dequantize_codes(q, scale, zero))
    ref, codes = decode_int4_numpy(packed["qweight"], packed["scales"], packed["zeros"], k)
    np.testing.assert_array_equal(dense.double().numpy(), ref)
    # the padded tail holds the zero point (dequantizes to exactly 0)
    nb = -(-k // group)
    pad = codes[:, k:]
    np.testing.assert_array_equal(pad, np.broadcast_to(zero[:, nb - 1:nb].long().numpy(), pad.shape))
    # rounding error: half a step, plus at the range ends the zero-point rounding and fp16 scale rounding
    err = (W - dense).abs()
    step = fmt.expand_groups(scale, k)
    assert bool((err <= step * 1.0 + 1e-6).all())
    assert float((err <= step * 0.5 + 1e-6).float().mean()) > 0.95


@pytest.mark.parametrize("k", [64, 37])
def test_int8_round_trip_exact(k):
    torch.manual_seed(k)
    fmt = Int8Format()
    W = torch.randn(3, 16, k)  # stacked (experts) leading dim
    packed = fmt.quantize_rtn(W)
    fmt.check(packed, 16, k, (3,))
    assert packed["qweight"].dtype == torch.int8 and packed["scales"].dtype == torch.float16
    q, s, z = fmt.unpack(packed, k)
    assert z is None and torch.equal(fmt.from_codes(q, s)["qweight"], packed["qweight"])
    dense = fmt.dequantize(packed, k)
    ref = packed["qweight"].double().numpy() * packed["scales"].double().numpy()[..., None]
    np.testing.assert_array_equal(dense.double().numpy(), ref)
    assert int(packed["qweight"].abs().max()) <= 127
    assert bool(((W - dense).abs() <= s.expand_as(W[..., :1]) * 0.5 + 1e-7).all())


def test_stacked_int4_matches_per_matrix():
    fmt = Int4Format(32)
    W = torch.randn(4, 10, 70)
    stacked = fmt.quantize_rtn(W)
    for e in range(4):
        single = fmt.quantize_rtn(W[e])
        for name in single:
            assert torch.equal(stacked[name][e], single[name])


def test_zero_rows_and_tiny_scales_stay_finite():
    for fmt in (Int8Format(), Int4Format(32), Int4Format(32, True)):
        W = torch.zeros(4, 64)
        W[1] = 1e-9
        dense = fmt.dequantize(fmt.quantize_rtn(W), 64)
        assert torch.isfinite(dense).all()
        assert torch.equal(dense[0], torch.zeros(64))


def test_clip_ratio_shrinks_range():
    fmt = Int4Format(32)
    W = torch.randn(8, 64)
    s1, _ = fmt.params(W, 1.0)
    s2, _ = fmt.params(W, 0.5)
    assert bool((s2 <= s1).all()) and bool((s2 < s1).any())


def test_serialization_and_registry():
    for fmt in (Int8Format(), Int4Format(64), Int4Format(128, True)):
        assert format_from_dict(fmt.to_dict()) == fmt
    assert set(FORMATS) >= {"int8", "int4"}
    with pytest.raises(ConfigError, match="unknown weight format"):
        format_from_dict({"format": "int3"})
    with pytest.raises(ConfigError, match="unknown keys"):
        format_from_dict({"format": "int4", "group_size": 64, "blocksize": 3})
    with pytest.raises(ConfigError, match="group size"):
        Int4Format(48)


@pytest.mark.parametrize("bits", [2, 3, 16])  # 1 = the binary format (qmamba.quant.binary)
def test_unsupported_bits(bits):
    with pytest.raises(ConfigError, match="unsupported bit width"):
        make_format(bits)


FORMAT_CASES = [Int8Format(), Int4Format(32), Int4Format(128, symmetric=True)]


def _all_formats():
    from qmamba.quant.binary import BinaryFormat

    return FORMAT_CASES + [BinaryFormat(), BinaryFormat(row_scale=True)]


@pytest.mark.parametrize("lead", [(), (3,)])
def test_each_format_gives_its_kernel_record(lead):
    """``fmt.kernel_weight`` (the one format -> kernel-record place): the record's dense values are the format's
    own dequantization, for one matrix and for a stack; int4 records carry the format's group size, which is checked
    against the tensors."""
    from qmamba.kernels.weights import PackedWeight
    from qmamba.quant.layout import LayoutError

    n, k = 12, 150
    for fmt in _all_formats():
        packed = fmt.quantize_rtn(torch.randn(*lead, n, k))
        record = fmt.kernel_weight(packed, n, k)
        assert record.n_experts == (lead[0] if lead else 1)
        torch.testing.assert_close(record.dequantized().reshape(*lead, n, k), fmt.dequantize(packed, k),
                                   rtol=0, atol=0)
        if isinstance(fmt, Int4Format):
            assert record.group_size == fmt.group_size
            with pytest.raises(LayoutError):
                PackedWeight.from_int4(packed, n, k, 64)  # not this matrix's group size


def test_each_registered_format_has_its_onnx_form():
    """Every registered format defines its own MatMulNBits form (the export asks the format, never its name);
    a format registered by subclassing another has none until it defines one."""
    from qmamba.quant import formats

    n, k = 6, 40
    for fmt in _all_formats():
        assert fmt.has_onnx_form
        form = fmt.matmul_nbits(fmt.quantize_rtn(torch.randn(n, k)), n, k)
        assert form.bits == fmt.bits if fmt.bits != 1 else form.bits == 2  # 1-bit: the exact 2-bit form
        assert all(t.shape[0] == n for t in form.weights.values())
    assert set(FORMATS) >= {"int8", "int4", "binary"}

    class Renamed(formats.Int8Format):
        pass

    assert not Renamed().has_onnx_form
