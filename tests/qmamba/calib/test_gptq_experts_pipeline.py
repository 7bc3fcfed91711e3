"""The calibration walk quantizes each MoE linear's experts with one batched GPTQ solve; the packed experts, the
fallbacks and the whole quantized model are exactly those of solving each expert by itself (the walk without
``solve_stack``)."""

import dataclasses

import pytest
import torch

import qmamba.calib.gptq as gptq
from qmamba.calib.methods import METHODS
from qmamba.calib.pipeline import CalibOptions, calibrate
from qmamba.calib.recipe import build_plan
from qmamba.checkpoints.load import load_model


def calibrated(ckpt, ids, bits, skew_router):
    model = load_model(ckpt)
    if skew_router:  # route (almost) everything to expert 0: the others use all-token statistics
        for block in model.blocks:
            if not block.is_mamba:
                block.mixer.router.bias.data[0] = 1e4
    results = calibrate(model, ids, build_plan(model, bits, 32 if bits == 4 else None, method="gptq"),
                        CalibOptions(progress=False, batch_size=2))
    return model, results


@pytest.mark.parametrize("bits,skew_router", [(4, False), (4, True), (8, False)])
def test_batched_expert_gptq_equals_per_expert_solves(tiny_checkpoint, monkeypatch, bits, skew_router):
    ids = torch.randint(0, load_model(tiny_checkpoint).config.vocab_size, (4, 48),
                        generator=torch.Generator().manual_seed(0))
    stacks = []
    real = gptq.gptq_quantize_batched

    def counting(W, H, *args, **kwargs):
        stacks.append(W.shape[0])
        return real(W, H, *args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize_batched", counting)
    model_b, res_b = calibrated(tiny_checkpoint, ids, bits, skew_router)
    n_experts = {block.mixer.experts.n_experts for block in model_b.blocks if not block.is_mamba}
    assert set(stacks) == {1} | n_experts and min(n_experts) > 1  # Mamba linears alone, experts as a stack

    with monkeypatch.context() as m:  # the per-expert walk: solve() on each expert
        m.setitem(METHODS, "gptq", dataclasses.replace(METHODS["gptq"], solve_stack=None))
        model_1, res_1 = calibrated(tiny_checkpoint, ids, bits, skew_router)

    assert res_b.keys() == res_1.keys()
    expert_names = [name for name, r in res_b.items() if r.kind.startswith("experts.")]
    assert expert_names
    for name in res_b:
        assert res_b[name].fallbacks == res_1[name].fallbacks, name
        assert res_b[name].packed.keys() == res_1[name].packed.keys()
        for key, t in res_b[name].packed.items():
            assert torch.equal(t, res_1[name].packed[key]), (name, key)
        assert res_b[name].noise == pytest.approx(res_1[name].noise, rel=1e-6)
    if skew_router:
        assert any(res_b[name].fallbacks for name in expert_names)
    sd_b, sd_1 = model_b.state_dict(), model_1.state_dict()
    for key in sd_b:
        assert torch.equal(sd_b[key], sd_1[key]), key
