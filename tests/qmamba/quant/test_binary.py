"""The 1-bit binary format: exact packing (checked by an independent numpy decoder written from the layout
description), sign(0) = +1, PTB statistics, registry round trips, and the modules against ``x @ W_hat^T``."""

import numpy as np
import pytest
import torch

from qmamba.errors import CheckpointError, ConfigError
from qmamba.moe import StackedExperts
from qmamba.quant import layout
from qmamba.quant.binary import BinaryExperts, BinaryFormat, BinaryLinear, binary_matmul
from qmamba.quant.formats import Int4Format, format_from_dict, make_format
from qmamba.quant.modules import QuantExperts, quantized_module_names, swap_quantized_modules

FORMATS = [BinaryFormat(), BinaryFormat(row_scale=True)]


def decode_binary_numpy(qweight, alpha, beta, k, row_scale=None):
    """Independent decoder: bit j (LSB first) of byte b is column 8 b + j; 1 -> +1, 0 -> -1."""
    q = qweight.numpy().astype(np.int64)
    n, nbytes = q.shape
    signs = np.empty((n, nbytes * 8), dtype=np.float64)
    for b in range(nbytes):
        for j in range(8):
            signs[:, 8 * b + j] = np.where((q[:, b] >> j) & 1, 1.0, -1.0)
    w = signs[:, :k] * alpha.numpy().astype(np.float64)[None, :] + beta.numpy().astype(np.float64)[None, :]
    if row_scale is not None:
        w = w * row_scale.numpy().astype(np.float64)[:, None]
    return w, signs


@pytest.mark.parametrize("k", [8, 13, 37, 64, 150])
def test_pack_unpack_exact(k):
    g = torch.Generator().manual_seed(k)
    bits = torch.randint(0, 2, (2, 5, k), generator=g, dtype=torch.uint8)
    packed = layout.pack_signs(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, -(-k // 8))
    assert torch.equal(layout.unpack_signs(packed, k), bits)
    # byte b, bit j <-> column 8 b + j, written out by hand for one row
    row = bits[0, 0].tolist() + [0] * (8 * packed.shape[-1] - k)
    expect = [sum(row[8 * b + j] << j for j in range(8)) for b in range(packed.shape[-1])]
    assert packed[0, 0].tolist() == expect
    if k % 8:  # padded tail bits are zero
        assert int(packed[..., -1].max()) < (1 << (k % 8))


def test_pack_rejects_non_bits():
    with pytest.raises(layout.LayoutError):
        layout.pack_signs(torch.tensor([[0, 2, 1]], dtype=torch.uint8))


def test_sign_of_zero_is_plus_one():
    W = torch.tensor([[0.0, -0.0, 1.0, -1.0, 0.0, 2.0, -3.0, 0.5, 0.0]])
    assert layout.binary_signs(W).tolist() == [[1, 1, 1, 0, 1, 1, 0, 1, 1]]
    from qmamba.quant.binarize import signs_for

    # W - beta == 0 exactly -> +1 as well
    beta = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 2.0, -3.0, 0.5, 0.0])
    assert signs_for(W, beta).tolist() == [[1] * 9]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("k", [16, 37])
def test_format_round_trip_exact(fmt, k):
    torch.manual_seed(k)
    W = torch.randn(24, k) * torch.rand(24, 1) + 0.1 * torch.randn(1, k)
    ab, r = fmt.params(W)
    bits = fmt.quantize(W, ab, r)
    W_hat = fmt.dequantize_codes(bits, ab, r)
    packed = fmt.from_codes(bits, ab, r)
    fmt.check(packed, 24, k)
    assert set(packed) == set(fmt.buffer_specs(24, k))
    assert torch.equal(fmt.dequantize(packed, k), W_hat)
    ref, signs = decode_binary_numpy(packed["qweight"], packed["alpha"], packed["beta"], k, packed.get("row_scale"))
    np.testing.assert_array_equal(W_hat.double().numpy(), ref.astype(np.float32).astype(np.float64))
    assert torch.equal(torch.from_numpy(signs[:, :k] > 0).to(torch.uint8), bits)
    got_bits, got_ab, got_r = fmt.unpack(packed, k)
    assert torch.equal(got_bits, bits) and torch.equal(got_ab, ab)
    assert (got_r is None) == (r is None)


def test_ptb_column_statistics():
    torch.manual_seed(0)
    W = torch.randn(40, 12) * 0.05 + torch.linspace(-0.1, 0.1, 12)
    fmt = BinaryFormat()
    packed = fmt.quantize_rtn(W)
    w = W.double().numpy()
    beta = w.mean(axis=0)
    alpha = np.abs(w - beta.astype(np.float16).astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(packed["beta"].double().numpy(), beta, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(packed["alpha"].double().numpy(), alpha, atol=1e-3, rtol=1e-3)
    signs = (w - packed["beta"].double().numpy() >= 0)
    assert np.array_equal(layout.unpack_signs(packed["qweight"], 12).numpy().astype(bool), signs)


def test_row_scale_helps_rows_of_different_magnitude():
    torch.manual_seed(1)
    W = torch.randn(64, 96) * torch.logspace(-2, 0, 64)[:, None]
    err = {}
    for fmt in FORMATS:
        err[fmt.row_scale] = float((fmt.fake_quantize(W) - W).norm() / W.norm())
    assert err[True] < 0.8 * err[False]


def test_stacked_experts_packed_per_expert():
    torch.manual_seed(2)
    W = torch.randn(3, 10, 20)
    fmt = BinaryFormat()
    packed = fmt.quantize_rtn(W)
    fmt.check(packed, 10, 20, (3,))
    for e in range(3):
        one = fmt.quantize_rtn(W[e])
        assert all(torch.equal(packed[name][e], one[name]) for name in one)


def test_registry_round_trip_and_errors():
    for fmt in FORMATS:
        assert format_from_dict(fmt.to_dict()) == fmt
    assert make_format(1) == BinaryFormat()
    assert BinaryFormat().to_dict() == {"format": "binary", "bits": 1, "row_scale": False}
    with pytest.raises(ConfigError, match="group_size"):
        format_from_dict({"format": "binary", "group_size": 128})
    with pytest.raises(ConfigError, match="1 bits"):
        format_from_dict({"format": "binary", "bits": 4})
    with pytest.raises(ConfigError):
        make_format(2)
    with pytest.raises(layout.LayoutError, match="alpha"):
        BinaryFormat().check({"qweight": torch.zeros(4, 2, dtype=torch.uint8), "alpha": torch.zeros(9),
                              "beta": torch.zeros(16, dtype=torch.float16)}, 4, 16)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("bias", [False, True])
def test_binary_linear_matches_dense(fmt, bias):
    torch.manual_seed(3)
    lin = torch.nn.Linear(45, 30, bias=bias)
    mod = BinaryLinear.from_linear(lin, fmt)
    assert isinstance(mod, BinaryLinear)
    x = torch.randn(2, 7, 45)
    W_hat = fmt.dequantize(mod.packed(), 45).double()
    ref = x.double() @ W_hat.T + (lin.bias.double() if bias else 0)
    torch.testing.assert_close(mod(x).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(binary_matmul(x, mod.packed(), 45).double(), x.double() @ W_hat.T,
                               atol=1e-5, rtol=1e-5)
    # bf16 activations: packed buffers keep their dtypes, result close to the fp32 one
    mod16 = BinaryLinear.from_linear(lin, fmt).to(torch.bfloat16)
    assert mod16.alpha.dtype == torch.float16 and mod16.qweight.dtype == torch.uint8
    torch.testing.assert_close(mod16(x.bfloat16()).float(), ref.float(), atol=0.1, rtol=0.05)


def test_binary_linear_rejects_other_formats():
    with pytest.raises(TypeError):
        BinaryLinear(8, 8, Int4Format(16))


def _expert_oracle(x, idx, fc1, fc2, gated, act):
    out = torch.zeros(x.shape[0], fc2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        h = fc1[idx[t]].double() @ x[t].double()
        if gated:
            a, b = h.chunk(2)
            h = act(a) * b
        else:
            h = act(h)
        out[t] = fc2[idx[t]].double() @ h
    return out


@pytest.mark.parametrize("fc2_fmt", [BinaryFormat(), Int4Format(16), None], ids=["binary", "int4", "float"])
def test_binary_experts_match_per_token_oracle(fc2_fmt):
    torch.manual_seed(4)
    experts = StackedExperts(3, 32, 24, gated=True, activation="gelu")
    with torch.no_grad():
        experts.fc1.normal_(0, 0.2), experts.fc2.normal_(0, 0.2)
    mod = BinaryExperts.from_stacked(experts, BinaryFormat(), fc2_fmt)
    x = torch.randn(11, 32)
    idx = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0])
    fc1 = mod.fc1.dequantized()
    fc2 = mod.fc2.dequantized() if fc2_fmt is not None else mod.fc2.detach()
    ref = _expert_oracle(x, idx, fc1, fc2, True, torch.nn.functional.gelu)
    torch.testing.assert_close(mod(x, idx).double(), ref, atol=1e-5, rtol=1e-5)


def test_swap_builds_binary_modules_from_manifest():
    from qmamba.config import preset
    from qmamba.model import MambaLM

    with torch.device("meta"):
        model = MambaLM(preset("tiny-blackmamba"))
    entries = {"layers.0.mixer.in_proj": {"format": "binary", "bits": 1, "row_scale": False, "method": "ptb"},
               "layers.0.mixer.out_proj": {"format": "int4", "group_size": 32, "symmetric": False},
               "layers.1.mixer.experts.fc1": {"format": "binary", "row_scale": True},
               "layers.1.mixer.experts.fc2": {"format": "int8"}}
    swap_quantized_modules(model, entries)
    assert type(model.layers[0].mixer.in_proj) is BinaryLinear
    assert type(model.layers[0].mixer.out_proj).__name__ == "QuantLinear"
    experts = model.layers[1].mixer.experts
    assert isinstance(experts, BinaryExperts) and isinstance(experts, QuantExperts)
    assert experts.fc1.row_scale.shape == (4, 2 * 96) and experts.fc1.qweight.shape == (4, 2 * 96, 8)
    assert sorted(quantized_module_names(model)) == sorted(entries)
    with pytest.raises(CheckpointError, match="row_scale"):
        swap_quantized_modules(model, {"layers.2.mixer.in_proj": {"format": "binary", "row_scale": 3, "x": 1}})
