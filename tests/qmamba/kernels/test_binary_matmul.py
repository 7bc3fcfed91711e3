"""1-bit Triton kernel (under TRITON_INTERPRET=1 on CPU, set by tests/conftest.py before triton is imported)
against ``x @ W_hat^T`` from the dequantized layout: GEMV, small-M dot and GEMM tiles, K not a multiple of 8 or of
the K tile, row-scale variant, bias, per-expert routing (decode and prefill tiles), the binary MoE forward (also
with int4 fc2) against the PyTorch SwitchMoE, and a whole binarized model on the triton backend."""

import pytest
import torch

from qmamba.kernels import custom_ops, triton_ops
from qmamba.kernels.binary_matmul import binary_matmul, binary_matmul_ref
from qmamba.kernels.fused_moe import moe_forward, moe_forward_ref
from qmamba.kernels.matmul_configs import GEMV_MAX_M, BinaryConfig, MatmulPolicy, pick_binary_config
from qmamba.kernels.weights import BinaryWeight
from qmamba.quant.binary import BinaryExperts, BinaryFormat
from qmamba.quant.formats import Int4Format

FORMATS = [BinaryFormat(), BinaryFormat(row_scale=True)]


def make_weight(fmt, n, k, device, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*lead, n, k, generator=g) / k ** 0.5 + 0.02 * torch.randn(*lead, 1, k, generator=g)
    packed = {name: t.to(device) for name, t in fmt.quantize_rtn(W).items()}
    return packed, BinaryWeight.from_packed(packed, n, k)


def close(got, ref, dtype):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k", [150, 64])
def test_dense_matches_dequantized(fmt, m, k, device):
    n = 37
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    packed, w = make_weight(fmt, n, k, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device)
    got = binary_matmul(x, w, bias)
    W_hat = fmt.dequantize(packed, k)
    ref = x.float() @ W_hat.t() + bias
    assert got.dtype == dtype and got.shape == (m, n)
    close(got, ref, dtype)
    close(binary_matmul_ref(x, w, bias), ref, dtype)


def test_explicit_tiles_agree(device):
    packed, w = make_weight(BinaryFormat(), 50, 203, device, seed=1)
    x = torch.randn(20, 203, device=device)
    ref = x @ w.dequantized()[0].t()
    for cfg in (BinaryConfig(1, 16, 8, 1, 1), BinaryConfig(16, 16, 32, 1, 1), BinaryConfig(32, 64, 128, 1, 1)):
        xs = x[:1] if cfg.block_m == 1 else x
        close(binary_matmul(xs, w, config=cfg), ref[: xs.shape[0]], torch.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        binary_matmul(x, w, config=BinaryConfig(16, 16, 12))
    with pytest.raises(ValueError, match="x must be"):
        binary_matmul(x[:, :10], w)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("m", [3, 16, 40])
def test_routed_rows(fmt, m, device):
    n, k, e = 24, 72, 4
    _, w = make_weight(fmt, n, k, device, lead=(e,), seed=2)
    x = torch.randn(m, k, device=device)
    row_expert = torch.randint(0, e - 1, (m,), device=device).to(torch.int32)  # expert e-1 gets no rows
    gate = torch.rand(m, device=device)
    got = binary_matmul(x, w, row_expert=row_expert, row_scale=gate)
    dense = w.dequantized()
    ref = torch.stack([dense[row_expert[i]] @ x[i] for i in range(m)]) * gate[:, None]
    close(got, ref, torch.float32)
    close(binary_matmul_ref(x, w, row_expert=row_expert, row_scale=gate), ref, torch.float32)
    with pytest.raises(ValueError, match="row_expert"):
        binary_matmul(x, w)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("n,k", [(37, 64), (50, 96), (70, 352)])
def test_word_gemv_configs(fmt, n, k, device):
    """The M = 1 word kernel (K a multiple of 32): words per iteration, BLOCK_N and split-K (atomics into a zeroed
    float32 ``out``) over a partial last word-block, with bias; the tile kernel (word kernel off) agrees."""
    from qmamba.kernels.weights import int32_words

    packed, w = make_weight(fmt, n, k, device, seed=4)
    words = int32_words(w.qweight)  # what the word kernel reads: a view of the same bytes, 32 sign bits a word
    assert words is not None and words.shape == (1, n, k // 32) and words.data_ptr() == w.qweight.data_ptr()
    assert torch.equal(words.view(torch.uint8), w.qweight.reshape(1, n, -1))
    assert int32_words(make_weight(fmt, n, k + 8, device)[1].qweight) is None  # rows not whole words: no view
    x = torch.randn(1, k, device=device)
    bias = torch.randn(n, device=device)
    ref = x @ w.dequantized()[0].t() + bias
    for cfg in (None, BinaryConfig(1, 16, 32, 1, 1, 1), BinaryConfig(1, 32, 64, 1, 1, 2),
                BinaryConfig(1, 64, 128, 4, 1, 4)):
        close(binary_matmul(x, w, bias, config=cfg), ref, torch.float32)
    out = torch.zeros(1, n, device=device)
    binary_matmul(x, w, bias, config=BinaryConfig(1, 32, 32, 1, 1, 3), out=out)
    close(out, ref, torch.float32)
    with pytest.raises(ValueError, match="zeroed float32"):
        binary_matmul(x.half(), w, config=BinaryConfig(1, 32, 32, 1, 1, 2), out=torch.zeros(1, n, device=device,
                                                                                              dtype=torch.half))
    close(binary_matmul(x, w, bias, policy=MatmulPolicy(binary_word_gemv=False)), ref, torch.float32)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("split", [1, 2])
def test_word_gemv_routed(m, split, device):
    """Decode MoE on the word kernel: row r reads the words of expert row_expert[r] (one program row per row),
    the gate multiplies in the epilogue; an expert without rows is never read."""
    n, k, e = 40, 128, 4
    _, w = make_weight(BinaryFormat(row_scale=True), n, k, device, lead=(e,), seed=6)
    x = torch.randn(m, k, device=device)
    dense = w.dequantized()
    row_expert = torch.randint(0, e - 1, (m,), device=device).to(torch.int32)
    gate = torch.rand(m, device=device)
    got = binary_matmul(x, w, row_expert=row_expert, row_scale=gate, config=BinaryConfig(1, 16, 64, 1, 1, split))
    ref = torch.stack([dense[row_expert[i]] @ x[i] for i in range(m)]) * gate[:, None]
    close(got, ref, torch.float32)


def test_word_gemv_several_rows_dense(device):
    """M = 5 on a small matrix takes the word kernel by default; a big one (N * K over the limit) the tile kernel."""
    _, w = make_weight(BinaryFormat(), 48, 96, device, seed=7)
    assert pick_binary_config(5, w, torch.device(device)).block_m == 1
    x = torch.randn(5, 96, device=device)
    close(binary_matmul(x, w), x @ w.dequantized()[0].t(), torch.float32)
    small = MatmulPolicy(word_gemv_max_weights=48 * 96 - 1)
    assert pick_binary_config(5, w, torch.device(device), small).block_m > 1
    assert pick_binary_config(1, w, torch.device(device), small).block_m == 1  # M = 1 always
    close(binary_matmul(x, w, policy=small), x @ w.dequantized()[0].t(), torch.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_dequantize_triton_matches_layout(fmt, device):
    """One-pass Triton dequantization (the M > 16 path on CUDA) == the layout's dequantization, experts stacked,
    K not a multiple of 8 or of the K tile."""
    from qmamba.kernels.binary_matmul import dequantize_binary_triton

    _, w = make_weight(fmt, 33, 150, device, lead=(3,), seed=8)
    got = dequantize_binary_triton(w, torch.float32)
    torch.testing.assert_close(got, w.dequantized(), atol=0, rtol=0)
    assert dequantize_binary_triton(w, torch.float16).dtype == torch.float16


@pytest.mark.parametrize("routed", [False, True])
def test_large_m_paths(routed, device):
    """M = 40 in the activation dtype of the device (fp16 on CUDA: dequantization + cuBLAS / float grouped GEMM;
    fp32 on the interpreter: the tile kernel)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    e = 3 if routed else 1
    _, w = make_weight(BinaryFormat(row_scale=True), 64, 160, device, lead=(e,) if routed else (), seed=9)
    x = torch.randn(40, 160, device=device).to(dtype)
    dense = w.dequantized()
    if routed:
        row_expert = torch.randint(0, e, (40,), device=device).to(torch.int32)
        gate = torch.rand(40, device=device)
        got = binary_matmul(x, w, row_expert=row_expert, row_scale=gate)
        ref = torch.stack([dense[row_expert[i]] @ x[i].float() for i in range(40)]) * gate[:, None]
    else:
        bias = torch.randn(64, device=device)
        scale = torch.rand(40, device=device)
        got = binary_matmul(x, w, bias, row_scale=scale)
        ref = (x.float() @ dense[0].t() + bias) * scale[:, None]
    assert got.dtype == dtype
    close(got, ref, dtype)


def test_custom_op_and_fake(device):
    packed, w = make_weight(BinaryFormat(row_scale=True), 12, 40, device, seed=3)
    x = torch.randn(2, 3, 40, device=device)
    got = triton_ops.linear(x, w)  # through the qmamba::binary_matmul op
    close(got, x @ w.dequantized()[0].t(), torch.float32)

    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(5, 40)
        out = custom_ops.binary_matmul(fx, 12, 40, torch.empty(1, 12, 5, dtype=torch.uint8),
                                       torch.empty(1, 40, dtype=torch.half), torch.empty(1, 40, dtype=torch.half),
                                       None, None)
        assert out.shape == (5, 12)


@pytest.mark.parametrize("fc2_fmt", [BinaryFormat(), Int4Format(32)], ids=["binary", "int4"])
@pytest.mark.parametrize("t", [1, 21])
def test_binary_moe_matches_switch_moe(fc2_fmt, t, device):
    from qmamba.config import preset
    from qmamba.moe import SwitchMoE

    torch.manual_seed(5)
    cfg = preset("tiny-blackmamba")
    moe = SwitchMoE(cfg, 4).to(device)
    with torch.no_grad():
        moe.experts.fc1.normal_(0, 0.1), moe.experts.fc2.normal_(0, 0.1)
    moe.experts = BinaryExperts.from_stacked(moe.experts, BinaryFormat(), fc2_fmt)
    x = torch.randn(t, cfg.d_model, device=device)
    ref = moe(x)  # reference backend
    operands = moe.kernel_operands(x.dtype)  # router weight and bias, fc1 / fc2 records, activation, gated
    got = moe_forward(x, *operands)
    close(got, ref, torch.float32)
    close(moe_forward_ref(x, *operands), ref, torch.float32)
    moe.backend = "triton"  # SwitchMoE -> triton_ops.switch_moe -> the one MoE forward (no custom op for 1-bit)
    close(moe(x[None]).reshape(t, -1), ref, torch.float32)


def test_binarized_model_triton_equals_reference(device):
    from qmamba.config import preset
    from qmamba.testing import random_model
    from qmamba.quant.modules import swap_quantized_modules

    cfg = preset("tiny-blackmamba")
    model = random_model(cfg, device=device)
    float_sd = model.state_dict()
    fmt = BinaryFormat()
    entries = {}
    for block in model.blocks:
        leaves = ("in_proj", "out_proj") if block.is_mamba else ("experts.fc1", "experts.fc2")
        entries.update({f"{block.mixer_name}.{leaf}": fmt.to_dict() for leaf in leaves})
    swap_quantized_modules(model, entries)
    sd = {}
    for name, t in float_sd.items():
        owner = next((m for m in entries if name in (f"{m}.weight", m)), None)
        if owner is None:
            sd[name] = t
        else:
            sd.update({f"{owner}.{key}": v for key, v in fmt.quantize_rtn(t).items()})
    model.load_state_dict(sd, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=device)
    ref = model(ids)
    from qmamba.moe import SwitchMoE
    from qmamba.quant.modules import QuantExperts, QuantLinear

    for mod in model.modules():  # the 1-bit paths only: the scan/conv kernels have their own tests
        if isinstance(mod, (QuantLinear, QuantExperts, SwitchMoE)):
            mod.backend = "triton"
    close(model(ids), ref, torch.float32)
    _, state = model.prefill(ids[:, :6])
    close(model.step(ids[:, 6], state), ref[:, 6], torch.float32)


# ---- bit-position dots (one matrix, 8..16 rows by default) -------------------------------------------------------
DOTS = MatmulPolicy(binary_word_dots_min_rows=2)  # every 2..16 rows on the dots (the default: from 8)


def _spy_word_dots(monkeypatch, tile=None):
    """Count the launches of the bit-position dots; ``tile``: force ``(block_n, warps, split)``."""
    from qmamba.kernels import binary_matmul as bm

    calls = []
    real = bm._word_dots_matmul
    monkeypatch.setattr(bm, "_word_dots_matmul", lambda *a: calls.append(1) or real(*a))
    if tile is not None:
        monkeypatch.setattr(bm, "binary_word_dots_tile", lambda *a: tile)
    return calls


def _dots_dtypes(device):
    # the interpreter's 16-bit float dots: fp16 only (a bf16 dot of 16 x 16 tiles, even a plain one, comes out wrong)
    return (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.float16)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("m", [2, 8, 16])
@pytest.mark.parametrize("k", [64, 544, 1472])
def test_word_dots_dense(fmt, m, k, device, monkeypatch):
    """One matrix at 2-16 rows on the bit-position dots (K a multiple of 32): K of one partial 512-column tile, one
    full tile and a word past it, and BlackMamba-2.8B's 1472 (three tiles, the last partial), with bias, against the
    dequantized weight; the word GEMV (dots off) agrees."""
    calls = _spy_word_dots(monkeypatch)
    n = 70
    packed, w = make_weight(fmt, n, k, device, seed=11)
    W_hat = fmt.dequantize(packed, k).float()
    bias = torch.randn(n, device=device)
    for dtype in _dots_dtypes(device):
        x = torch.randn(m, k, device=device).to(dtype)
        ref = x.float() @ W_hat.t() + bias
        got = binary_matmul(x, w, bias, policy=DOTS)
        assert got.dtype == dtype and got.shape == (m, n)
        close(got, ref, dtype)
    assert len(calls) == 2
    off = binary_matmul(x, w, bias, policy=MatmulPolicy(binary_word_dots_min_rows=GEMV_MAX_M + 1))
    assert len(calls) == 2
    close(off, ref, x.dtype)


def test_word_dots_default_rows(device, monkeypatch):
    """By default one matrix takes the dots from 8 rows (not 1-7), K a multiple of 32 only; routed stacks never."""
    calls = _spy_word_dots(monkeypatch)
    n, k = 24, 96
    _, w = make_weight(BinaryFormat(), n, k, device, seed=14)
    for m, taken in ((1, 0), (4, 0), (7, 0), (8, 1), (16, 1)):
        x = torch.randn(m, k, device=device)
        close(binary_matmul(x, w), x @ w.dequantized()[0].float().t(), torch.float32)
        assert len(calls) == taken
        calls.clear()
    _, odd = make_weight(BinaryFormat(), n, 100, device, seed=15)
    binary_matmul(torch.randn(8, 100, device=device), odd)
    _, stack = make_weight(BinaryFormat(), n, k, device, lead=(3,), seed=16)
    binary_matmul(torch.randn(8, k, device=device), stack,
                  row_expert=torch.randint(0, 3, (8,), device=device).to(torch.int32))
    assert calls == []


def test_word_dots_split_k(device, monkeypatch):
    """Split along K (forced: 3 ways over 4 tiles, 16 weight rows a program): atomic adds into a new zeroed float32
    buffer, or into a given zeroed float32 ``out`` (bias once); a given ``out`` of another type is not split."""
    calls = _spy_word_dots(monkeypatch, tile=(16, 1 if device.type != "cuda" else 4, 3))
    n, k, m = 40, 2016, 5
    _, w = make_weight(BinaryFormat(row_scale=True), n, k, device, seed=13)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device)
    ref = x @ w.dequantized()[0].float().t() + bias
    close(binary_matmul(x, w, bias, policy=DOTS), ref, torch.float32)
    out = torch.zeros(m, n, device=device)
    assert binary_matmul(x, w, bias, out=out, policy=DOTS) is out
    close(out, ref, torch.float32)
    xh = x.half()
    out_h = torch.full((m, n), float("nan"), device=device, dtype=torch.half)  # stored, not added: no zeroing needed
    binary_matmul(xh, w, bias, out=out_h, policy=DOTS)
    close(out_h, xh.float() @ w.dequantized()[0].float().t() + bias, torch.float16)
    assert len(calls) == 3
