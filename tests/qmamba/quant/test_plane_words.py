"""int4 weights held as plane words in place (``use_plane_words``): the same model outputs on the reference and
Triton paths (prefill through the grouped expert GEMM, steps), the state dict still in the stored layout and
loadable both ways, group sizes without a plane form left alone."""

import copy

import pytest
import torch
from torch import nn

from qmamba.config import preset
from qmamba.kernels.weights import FMT_INT4, FMT_INT4_PLANES
from qmamba.quant.formats import Int4Format
from qmamba.quant.modules import QuantLinear, use_plane_words
from qmamba.testing import assert_prefill_and_step_match, quantize_rtn, random_model


def _linear(group, k=300, n=24):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(k, n), Int4Format(group))


def test_linear_plane_words_same_outputs_and_state_dict():
    mod = _linear(128)
    stored = {k: v.clone() for k, v in mod.state_dict().items()}
    x = torch.randn(5, 300)
    before = mod(x)
    assert mod.kernel_weight().fmt == FMT_INT4
    assert mod.use_plane_words() == stored["qweight"].numel()
    assert mod.use_plane_words() == 0  # once
    assert mod.qweight.dtype == torch.int32 and mod.kernel_weight().fmt == FMT_INT4_PLANES
    torch.testing.assert_close(mod(x), before, rtol=0, atol=0)
    saved = mod.state_dict()
    assert saved.keys() == stored.keys()
    for key, value in stored.items():
        assert torch.equal(saved[key], value), key
    fresh = _linear(128)
    fresh.qweight.zero_()
    fresh.use_plane_words()
    fresh.load_state_dict(stored)  # the stored layout into a plane-words module
    torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)
    plain = QuantLinear(300, 24, Int4Format(128), bias=True)
    plain.load_state_dict(saved)  # and what a plane-words module saves into a plain one
    torch.testing.assert_close(plain(x), before, rtol=0, atol=0)


def test_group_size_without_plane_form_is_left_alone():
    mod = _linear(64)
    assert mod.use_plane_words() == 0 and mod.qweight.dtype == torch.uint8


@pytest.mark.parametrize("name", ["tiny-blackmamba", "tiny-mamba"])
@torch.no_grad()
def test_model_on_plane_words_matches_reference(name, device):
    model = quantize_rtn(random_model(preset(name), device), Int4Format(128))
    ref_model = copy.deepcopy(model)
    assert use_plane_words(model) > 0
    model.set_backend("triton")
    ids = torch.randint(0, model.config.vocab_size, (2, 19), device=device)  # 19 x 2 tokens: the grouped GEMM
    ref_logits = assert_prefill_and_step_match(model, ref_model, ids)
    model.set_backend("reference")  # the reference path reads the stored layout back from the plane words
    torch.testing.assert_close(model.prefill(ids)[0], ref_logits, atol=1e-5, rtol=1e-5)
