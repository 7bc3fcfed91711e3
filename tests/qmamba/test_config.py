import pytest

from qmamba.config import PRESETS, ModelConfig, parse_layer_code, preset
from qmamba.errors import ConfigError, UserError


@pytest.mark.parametrize("name,total", [
    # parameter counts of the released checkpoints (reference doc: file sizes / published totals)
    ("blackmamba-2.8b", 2_783_213_584),
    ("blackmamba-1.5b", 1_458_462_072),
])
def test_blackmamba_preset_parameter_counts(name, total):
    assert preset(name).parameter_counts()["total"] == total


def test_blackmamba_2_8b_dims():
    cfg = preset("blackmamba-2.8b")
    assert (cfg.d_inner, cfg.dt_rank, cfg.n_layers, cfg.fc1_rows) == (2944, 92, 36, 7744)
    assert cfg.n_mamba_layers == 18 and len(cfg.moe_layer_ids) == 18


@pytest.mark.parametrize("code,expected", [("r", ("mamba", 0)), ("8", ("moe", 8)), ("4", ("moe", 4)),
                                           ("28", ("moe", 8))])
def test_layer_codes(code, expected):
    assert parse_layer_code(code, 0) == expected


@pytest.mark.parametrize("code", ["x", "r8", "r1", "1", "", "0"])
def test_unsupported_layer_codes_are_user_errors(code):
    with pytest.raises(UserError, match="layer 3"):
        parse_layer_code(code, 3)


def test_config_round_trip_and_unknown_keys():
    for name in PRESETS:
        cfg = preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    data = preset("tiny-mamba").to_dict()
    data["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.from_dict(data)


def test_invalid_values():
    with pytest.raises(ConfigError, match="d_model"):
        ModelConfig(d_model=0, layers=["r"], vocab_size=10)
    with pytest.raises(ConfigError, match="ffn_hidden"):
        ModelConfig(d_model=8, layers=["r", "8"], vocab_size=10)
    with pytest.raises(ConfigError, match="expert_activation"):
        ModelConfig(d_model=8, layers=["r"], vocab_size=10, expert_activation="swish2")
