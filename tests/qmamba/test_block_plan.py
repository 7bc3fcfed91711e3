"""The block plan: one spec per block with its kind, expert count and state slot; ``MambaLM.blocks`` carries the
model's block modules under the same specs, sees swapped submodules, survives ``deepcopy`` and is what prefill
writes the recurrent state by."""

import copy

import torch

from qmamba.block_plan import BlockSpec, ModelBlock, block_plan
from qmamba.config import ModelConfig, preset
from qmamba.quant.formats import Int8Format
from qmamba.testing import quantize_rtn, random_model


def mixed_config() -> ModelConfig:
    return ModelConfig(d_model=32, layers=["r", "4", "r", "r", "2"], vocab_size=64, ffn_hidden=48, d_state=4,
                       expert_gated=True)


def test_block_plan_lists_kinds_slots_and_names():
    plan = block_plan(mixed_config())
    assert [(b.index, b.kind, b.n_experts, b.slot) for b in plan] == [
        (0, "mamba", 0, 0), (1, "moe", 4, None), (2, "mamba", 0, 1), (3, "mamba", 0, 2), (4, "moe", 2, None)]
    assert [b.name for b in plan] == [f"layers.{i}" for i in range(5)]
    assert plan[1].mixer_name == "layers.1.mixer"
    assert list(plan[0].quantizable_modules()) == [f"layers.0.mixer.{leaf}"
                                                   for leaf in ("in_proj", "x_proj", "dt_proj", "out_proj")]
    assert plan[4].quantizable_modules() == {"layers.4.mixer.experts.fc1": "experts.fc1",
                                             "layers.4.mixer.experts.fc2": "experts.fc2"}


def test_model_blocks_are_the_plan_with_the_layers():
    cfg = mixed_config()
    model = random_model(cfg)
    assert all(isinstance(b, ModelBlock) for b in model.blocks)
    assert [BlockSpec(b.index, b.kind, b.n_experts, b.slot) for b in model.blocks] == list(block_plan(cfg))
    for block, layer in zip(model.blocks, model.layers, strict=True):
        assert block.module is layer and block.norm is layer.norm and block.mixer is layer.mixer
    assert not any(name.startswith("blocks") for name in model.state_dict())  # a plain tuple, not submodules


def test_model_blocks_see_swaps_and_follow_deepcopy():
    model = random_model(preset("tiny-blackmamba"))
    quantize_rtn(model, Int8Format())
    assert type(model.blocks[0].mixer.in_proj).__name__ == "QuantLinear"
    twin = copy.deepcopy(model)
    for block, layer in zip(twin.blocks, twin.layers, strict=True):
        assert block.module is layer
    assert twin.blocks[0].module is not model.blocks[0].module


def test_prefill_writes_each_mamba_block_state_to_its_slot():
    model = random_model(mixed_config(), seed=3)
    seen = {}
    handles = [b.mixer.register_forward_hook(lambda _m, _a, out, i=b.index: seen.__setitem__(i, out))
               for b in model.blocks if b.is_mamba]
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    _, state = model.prefill(ids)
    for h in handles:
        h.remove()
    assert sorted(seen) == [0, 2, 3]
    for block in model.blocks:
        if block.is_mamba:
            _, conv, ssm = seen[block.index]
            torch.testing.assert_close(state.conv_state[block.slot], conv, rtol=0, atol=0)
            torch.testing.assert_close(state.ssm_state[block.slot], ssm, rtol=0, atol=0)
