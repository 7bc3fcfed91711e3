"""Tight tier: quantized modules compute x @ W_hat^T (W_hat decoded independently) to float rounding; the module
swap gives a model that loads the quantized state dict and reproduces it; set_backend reaches every module."""

import copy

import pytest
import torch
from torch import nn

from qmamba.config import preset
from qmamba.errors import CheckpointError
from qmamba.model import MambaLM
from qmamba.moe import StackedExperts, expert_mlp
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.quant.layout import LayoutError
from qmamba.quant.modules import (PackedExpertWeight, QuantExperts, QuantLinear, quantized_module_names,
                                  swap_quantized_modules)
from qmamba.testing import random_model

FORMATS = [Int8Format(), Int4Format(32), Int4Format(64, True), Int4Format(128)]


def manual_int4_weight(packed, k):
    """W_hat from the layout description, written without qmamba.quant.layout."""
    qw, sc, zp = packed["qweight"], packed["scales"].double(), packed["zeros"]
    n, nb, half = qw.shape
    lo, hi = (qw & 15).long(), (qw >> 4).long()
    codes = torch.stack([lo, hi], -1).reshape(n, nb, 2 * half)
    z = torch.stack([(zp & 15).long(), (zp >> 4).long()], -1).reshape(n, -1)[:, :nb]
    return ((codes - z[:, :, None]) * sc[:, :, None]).reshape(n, -1)[:, :k]


def manual_weight(fmt, packed, k):
    if isinstance(fmt, Int8Format):
        return packed["qweight"].double() * packed["scales"].double()[:, None]
    return manual_int4_weight(packed, k)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_quant_linear_matches_dequantized_matmul(fmt, dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(100, 48, bias=True)
    q = QuantLinear.from_linear(lin, fmt)
    x = torch.randn(5, 7, 100, dtype=dtype)
    W_hat = manual_weight(fmt, q.packed(), 100)
    ref = (x.double() @ W_hat.T + lin.bias.double()).to(dtype)
    out = q.to(dtype)(x) if dtype == torch.float64 else q(x)
    assert out.shape == (5, 7, 48) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # and W_hat is close to the original weight (lossy but bounded)
    w = lin.weight.detach()
    assert float((W_hat.float() - w).norm() / w.norm()) < (0.01 if fmt.bits == 8 else 0.15)


@pytest.mark.parametrize("fmt1,fmt2", [(Int8Format(), Int4Format(32)), (Int4Format(64), None)])
@pytest.mark.parametrize("gated", [True, False])
def test_quant_experts_match_dequantized_experts(fmt1, fmt2, gated):
    torch.manual_seed(1)
    experts = StackedExperts(4, 64, 40, gated, "gelu")
    experts.fc1.data.normal_(0, 0.1)
    experts.fc2.data.normal_(0, 0.1)
    q = QuantExperts.from_stacked(experts, fmt1, fmt2)
    assert isinstance(q.fc1, PackedExpertWeight)
    assert isinstance(q.fc2, PackedExpertWeight) == (fmt2 is not None)
    x = torch.randn(30, 64)
    idx = torch.randint(0, 4, (30,))
    idx[:3] = 3
    out = q(x, idx)
    for t in range(30):
        e = int(idx[t])
        w1 = manual_weight(fmt1, q.fc1.packed(e), 64).float()
        w2 = experts.fc2[e] if fmt2 is None else manual_weight(fmt2, q.fc2.packed(e), 40).float()
        ref = expert_mlp(x[t:t + 1], w1, w2, "gelu", gated)
        torch.testing.assert_close(out[t:t + 1], ref, rtol=1e-5, atol=1e-6)


def test_swap_then_load_reproduces_model():
    torch.manual_seed(2)
    cfg = preset("tiny-blackmamba")
    model = MambaLM(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    fmt = Int4Format(32)
    manifest = {"layers.0.mixer.in_proj": {**fmt.to_dict(), "method": "rtn"},
                "layers.0.mixer.out_proj": Int8Format().to_dict(),
                "layers.1.mixer.experts.fc1": fmt.to_dict(),
                "layers.1.mixer.experts.fc2": fmt.to_dict(),
                "lm_head": Int8Format().to_dict()}
    quantized = swap_quantized_modules(MambaLM(cfg), manifest)
    # fill the swapped model by quantizing the float one module by module
    quantized.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    quantized.layers[0].mixer.in_proj = QuantLinear.from_linear(model.layers[0].mixer.in_proj, fmt)
    quantized.layers[0].mixer.out_proj = QuantLinear.from_linear(model.layers[0].mixer.out_proj, Int8Format())
    quantized.layers[1].mixer.experts = QuantExperts.from_stacked(model.layers[1].mixer.experts, fmt, fmt)
    quantized.lm_head = QuantLinear.from_linear(model.lm_head, Int8Format())
    assert sorted(quantized_module_names(quantized)) == sorted(manifest)
    sd = quantized.state_dict()
    assert "layers.0.mixer.in_proj.qweight" in sd and "layers.1.mixer.experts.fc1.zeros" in sd
    # a fresh model on the meta device, swapped, then loaded with assign=True gives the same logits
    with torch.device("meta"):
        fresh = MambaLM(cfg)
    swap_quantized_modules(fresh, {"modules": manifest})
    fresh.load_state_dict(sd, strict=True, assign=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():  # (the float model's parameters require grad)
        torch.testing.assert_close(fresh(ids), quantized(ids), rtol=0, atol=0)
        # and the quantized model stays close to the float one
        assert float((quantized(ids) - model(ids)).abs().max()) < 0.5


def test_swap_fills_twins_with_rtn_or_given_packed_tensors():
    """The one swap: ``rtn=True`` equals quantizing module by module with the twins' own constructors; ``packed``
    tensors are held bit for bit (and a packing of another shape is refused); a float bias is carried over; an
    expert stack given packed tensors for one of its two named matrices is refused."""
    model = random_model(preset("tiny-blackmamba"), seed=4)
    fmt = Int4Format(32)
    formats = {"layers.0.mixer.in_proj": fmt, "layers.0.mixer.x_proj": Int8Format(),
               "layers.1.mixer.experts.fc1": fmt, "lm_head": Int8Format()}
    swapped = swap_quantized_modules(copy.deepcopy(model), formats, rtn=True)
    mixer, moe = model.layers[0].mixer, model.layers[1].mixer
    expected = {"layers.0.mixer.in_proj": QuantLinear.from_linear(mixer.in_proj, fmt),
                "layers.0.mixer.x_proj": QuantLinear.from_linear(mixer.x_proj, Int8Format()),
                "layers.1.mixer.experts": QuantExperts.from_stacked(moe.experts, fmt, None),
                "lm_head": QuantLinear.from_linear(model.lm_head, Int8Format())}
    for name, ref in expected.items():
        got = swapped.get_submodule(name)
        assert type(got) is type(ref)
        for key, t in ref.state_dict().items():
            assert torch.equal(got.state_dict()[key], t), (name, key)
    assert isinstance(swapped.layers[1].mixer.experts.fc2, nn.Parameter)  # not named: stays float

    lin = nn.Linear(64, 16, bias=True)
    holder = nn.Sequential(lin)
    packed = fmt.quantize_rtn(torch.randn(16, 64))
    swap_quantized_modules(holder, {"0": fmt}, {"0": packed})
    for key, t in packed.items():
        assert torch.equal(getattr(holder[0], key), t)
    assert torch.equal(holder[0].bias, lin.bias)
    with pytest.raises(LayoutError):
        swap_quantized_modules(nn.Sequential(nn.Linear(64, 16)), {"0": fmt}, {"0": fmt.quantize_rtn(
            torch.randn(16, 32))})
    both = {"layers.1.mixer.experts.fc1": fmt, "layers.1.mixer.experts.fc2": fmt}
    with pytest.raises(ValueError, match="only one of the expert matrices"):
        swap_quantized_modules(copy.deepcopy(model), both,
                               {"layers.1.mixer.experts.fc1": fmt.quantize_rtn(moe.experts.fc1.detach())})


def test_set_backend_reaches_quantized_modules():
    model = swap_quantized_modules(MambaLM(preset("tiny-blackmamba")),
                                   {"layers.0.mixer.in_proj": Int8Format().to_dict(),
                                    "layers.1.mixer.experts.fc1": Int8Format().to_dict()})
    model.set_backend("triton")
    assert model.layers[0].mixer.in_proj.backend == "triton"
    assert model.layers[1].mixer.experts.backend == "triton"
    assert model.layers[0].mixer.backend == "triton"
    model.set_backend("reference")
    assert model.layers[0].mixer.in_proj.backend == "reference"


def test_swap_rejects_bad_manifest():
    model = MambaLM(preset("tiny-blackmamba"))
    with pytest.raises(CheckpointError, match="not a linear layer"):
        swap_quantized_modules(model, {"layers.0.norm": Int8Format().to_dict()})
    with pytest.raises(CheckpointError, match="unknown weight format"):
        swap_quantized_modules(model, {"layers.0.mixer.in_proj": {"format": "int5"}})


def test_dtype_casts_keep_packed_dtypes():
    lin = nn.Linear(64, 16, bias=True)
    q = QuantLinear.from_linear(lin, Int4Format(32))
    before = {k: v.clone() for k, v in q.packed().items()}
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
    assert all(torch.equal(q.packed()[k], before[k]) and q.packed()[k].dtype == before[k].dtype for k in before)


def test_load_packed_checks_shapes():
    q = QuantLinear(64, 32, Int4Format(32))
    with pytest.raises(ValueError, match="qweight"):
        q.load_packed(Int4Format(32).quantize_rtn(torch.randn(32, 96)))
