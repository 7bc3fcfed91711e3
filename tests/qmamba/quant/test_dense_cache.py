"""The dense cache of the quantized modules' reference path (issue 15, item 4): kept once, the model gives exactly
the outputs of the per-call path, never unpacks again, is never served stale after the packed tensors change,
and ``load_model`` keeps it on CPU (and says how many bytes it holds)."""

import pytest
import torch

from qmamba.checkpoints.load import load_model
from qmamba.checkpoints.native import save_checkpoint
from qmamba.config import ModelConfig
from qmamba.quant import layout
from qmamba.quant.binary import BinaryFormat
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.quant.modules import (PackedExpertWeight, QuantExperts, QuantLinear, drop_dense_weights,
                                  keep_dense_weights)
from qmamba.testing import quantize_rtn, random_model

CFG = ModelConfig(d_model=32, layers=["r", "4", "r"], vocab_size=96, ffn_hidden=48, d_state=4,
                  final_norm="layernorm")
FORMATS = {"int4": Int4Format(group_size=32), "int8": Int8Format(), "binary": BinaryFormat(),
           "binary-rowscale": BinaryFormat(row_scale=True)}


def quantized(name):
    return quantize_rtn(random_model(CFG, seed=1), FORMATS[name], head=True).eval()


def dense_weight_count(model) -> int:
    """Weights of the quantized modules, counted from their shapes."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.in_features * mod.out_features
        elif isinstance(mod, PackedExpertWeight):
            total += mod.n_experts * mod.n * mod.k
    return total


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cache_gives_the_same_outputs(name):
    model = quantized(name)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    want = model(ids)
    state = model.new_state(2)
    want_steps = [model.step(ids[:, t], state) for t in range(3)]
    extra = keep_dense_weights(model, torch.float32)
    binary = name.startswith("binary")
    # binary keeps +/-1 signs and column scales (a bit more than the dense matrix), int formats W_hat
    assert extra >= 4 * dense_weight_count(model) and (binary or extra == 4 * dense_weight_count(model))
    assert torch.equal(model(ids), want)
    state = model.new_state(2)
    for t in range(3):
        assert torch.equal(model.step(ids[:, t], state), want_steps[t])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cached_model_never_unpacks(name, monkeypatch):
    model = quantized(name)
    keep_dense_weights(model, torch.float32)

    def unpacked(*args, **kwargs):
        raise AssertionError("the packed weights were unpacked in a forward pass")

    for fn in ("dequantize_int4", "dequantize_int8", "signs_pm1", "unpack_signs", "unpack_int4"):
        monkeypatch.setattr(layout, fn, unpacked)
    model(torch.tensor([[1, 2, 3]]))
    drop_dense_weights(model)
    with pytest.raises(AssertionError, match="unpacked"):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("name", ["int4", "binary"])
def test_cache_is_never_stale(name):
    model = quantized(name)
    keep_dense_weights(model, torch.float32)
    other = quantized(name)
    with torch.no_grad():
        for a, b in zip(model.modules(), other.modules()):
            if isinstance(a, QuantLinear) and not isinstance(a, torch.nn.Linear):
                b.qweight.copy_(torch.flip(b.qweight, dims=[0]))  # different weights
                a.load_packed(b.packed())
            elif isinstance(a, PackedExpertWeight):
                b.load_packed({k: torch.flip(v, dims=[0]) for k, v in b.packed().items()})
                a.load_packed(b.packed())
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(ids), other(ids))  # other has no cache: the per-call path
    assert torch.equal(model.double()(ids), other.double()(ids))  # a dtype change drops the float32 cache


def test_load_model_keeps_the_cache_on_cpu(tmp_path):
    model = quantized("int4")
    entries = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            entries[name] = {**mod.fmt.to_dict(), "method": "rtn"}
        elif isinstance(mod, QuantExperts):
            entries.update({f"{name}.{w}": {**mod.fc1.fmt.to_dict(), "method": "rtn"} for w in ("fc1", "fc2")})
    save_checkpoint(model, CFG, tmp_path / "q", quantization=entries)
    cached = load_model(tmp_path / "q")
    plain = load_model(tmp_path / "q", dense_cache=False)
    assert cached.dense_cache_bytes == 4 * dense_weight_count(cached) and plain.dense_cache_bytes == 0
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.equal(cached(ids), plain(ids))
    assert torch.equal(cached(ids), model(ids))
