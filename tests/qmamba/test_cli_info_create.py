"""``qmamba create`` writes loadable checkpoints in every format; the same seed gives the same model in all of
them; ``qmamba info`` describes them."""

import json

import pytest
import torch
from click.testing import CliRunner

from qmamba.checkpoints.detect import detect_format
from qmamba.checkpoints.load import load_model
from qmamba.checkpoints.summary import compress_layer_plan
from qmamba.cli import main
from qmamba.config import preset

FORMATS = {"tiny-blackmamba": ["qmamba", "blackmamba"], "tiny-mamba": ["qmamba", "mamba_ssm", "hf"]}


def run(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_create_every_format_same_model(tmp_path, name):
    ids = torch.randint(0, preset(name).vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fmt in FORMATS[name]:
        out = tmp_path / fmt
        run("create", "--preset", name, "--format", fmt, "-o", out, "--seed", 3, "--dtype", "float32")
        assert detect_format(out) == fmt
        model = load_model(out)
        assert model.config.layers == preset(name).layers
        logits[fmt] = model(ids)
    reference = logits.pop("qmamba")
    for fmt, value in logits.items():
        assert torch.equal(value, reference), fmt


def test_seed_changes_weights(tmp_path):
    run("create", "--preset", "tiny-mamba", "-o", tmp_path / "a", "--seed", 1)
    run("create", "--preset", "tiny-mamba", "-o", tmp_path / "b", "--seed", 2)
    run("create", "--preset", "tiny-mamba", "-o", tmp_path / "c", "--seed", 1)
    a, b, c = (load_model(tmp_path / x).layers[0].mixer.in_proj.weight for x in "abc")
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_default_dtypes(tmp_path):
    run("create", "--preset", "tiny-blackmamba", "--format", "blackmamba", "-o", tmp_path / "bm")
    obj = torch.load(tmp_path / "bm" / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in obj["model"].values()} == {torch.bfloat16}
    run("create", "--preset", "tiny-mamba", "--format", "mamba_ssm", "-o", tmp_path / "ssm")
    sd = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in sd.values()} == {torch.float32}


def test_info_text_and_json(tmp_path):
    from tokenizers import Tokenizer, models

    tok = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tok))  # fits any vocabulary
    run("create", "--preset", "tiny-blackmamba", "--format", "blackmamba", "-o", tmp_path / "bm", "--tokenizer", tok)
    text = run("info", tmp_path / "bm")
    assert "format:      blackmamba" in text and "(r 4) x 2" in text and "experts" in text
    assert "bfloat16" in text and "tokenizer.json: yes" in text
    data = json.loads(run("info", tmp_path / "bm", "--json"))
    cfg = preset("tiny-blackmamba")
    assert data["parameters"] == cfg.parameter_counts()
    assert data["n_moe_layers"] == 2 and data["n_mamba_layers"] == 2
    # bf16: 2 bytes per stored parameter (the tied head is stored once)
    assert data["bytes_by_dtype"] == {"bfloat16": 2 * cfg.parameter_counts()["total"]}
    assert data["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "bm").iterdir())
    assert load_model(tmp_path / "bm").tokenizer_path == tmp_path / "bm" / "tokenizer.json"


def test_info_quantization_summary(tmp_path):
    from qmamba.checkpoints.load import build_model
    from qmamba.checkpoints.native import save_checkpoint
    from qmamba.checkpoints.random_init import random_state_dict
    from qmamba.quant.formats import format_from_dict
    from qmamba.quant.modules import QuantLinear

    cfg = preset("tiny-mamba")
    model = build_model(cfg, random_state_dict(cfg), {}, "cpu", torch.float32)
    entry = {"format": "int8"}
    quantization = {}
    for i in range(cfg.n_layers):
        mixer = model.layers[i].mixer
        mixer.out_proj = QuantLinear.from_linear(mixer.out_proj, format_from_dict(entry))
        quantization[f"layers.{i}.mixer.out_proj"] = dict(entry, method="rtn")
    save_checkpoint(model, cfg, tmp_path / "q", quantization=quantization)
    text = run("info", tmp_path / "q")
    assert "3 x int8 (rtn)" in text and "int8" in text


@pytest.mark.parametrize("codes,expected", [
    (["r", "8"] * 18, "(r 8) x 18"), (["r"] * 24, "r x 24"), (["r", "8", "8"], "r 8 8"), (["8", "r"] * 2, "(8 r) x 2"),
])
def test_compress_layer_plan(codes, expected):
    assert compress_layer_plan(codes) == expected
