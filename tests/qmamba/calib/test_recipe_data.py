"""Recipes (module selection, overrides, errors) and calibration data (corpus windows, files, bad input)."""

import json

import pytest
import torch

from qmamba.calib.data import CalibrationDataError, load_calibration
from qmamba.tokenizer import load_tokenizer
from qmamba.calib.recipe import RecipeError, build_plan, load_recipe, quantizable_modules
from qmamba.config import preset
from qmamba.errors import ConfigError, UserError
from qmamba.model import MambaLM


@pytest.fixture(scope="module")
def model():
    return MambaLM(preset("tiny-blackmamba"))


def test_default_selection(model):
    plan = build_plan(model, bits=4, group_size=64)
    assert set(plan) == {"layers.0.mixer.in_proj", "layers.0.mixer.out_proj", "layers.2.mixer.in_proj",
                         "layers.2.mixer.out_proj", "layers.1.mixer.experts.fc1", "layers.1.mixer.experts.fc2",
                         "layers.3.mixer.experts.fc1", "layers.3.mixer.experts.fc2"}
    assert all(e.fmt.describe() == "int4-g64" and e.method == "gptq" for e in plan.values())
    full = build_plan(model, bits=8, quantize_head=True, quantize_xdt=True)
    assert set(full) == set(quantizable_modules(model))
    # never quantized: norms, router, conv, SSM parameters
    assert not any("router" in n or "norm" in n or "conv" in n for n in quantizable_modules(model))


def test_recipe_overrides(model, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("default: {method: rtn}\n"
                    "rules:\n"
                    "  - {pattern: 'layers.*.mixer.out_proj', bits: 8}\n"
                    "  - {pattern: '*.experts.fc2', group_size: 32, method: awq}\n"
                    "  - {pattern: 'layers.0.mixer.in_proj', bits: 16}\n"
                    "  - {pattern: '*.x_proj', bits: 8, method: gptq}\n")
    plan = build_plan(model, bits=4, group_size=128, method="gptq", recipe=load_recipe(path))
    assert plan["layers.0.mixer.out_proj"].fmt.describe() == "int8"
    assert plan["layers.0.mixer.out_proj"].method == "rtn"  # recipe default wins over the CLI method
    assert plan["layers.1.mixer.experts.fc2"].fmt.describe() == "int4-g32"
    assert plan["layers.1.mixer.experts.fc2"].method == "awq"
    assert "layers.0.mixer.in_proj" not in plan and "layers.2.mixer.in_proj" in plan
    assert plan["layers.2.mixer.x_proj"].method == "gptq" and "layers.2.mixer.dt_proj" not in plan
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps({"rules": [{"pattern": "lm_head", "bits": 8}]}))
    assert "lm_head" in build_plan(model, recipe=load_recipe(json_path))


@pytest.mark.parametrize("text,match", [
    ("rules:\n  - {pattern: '*.in_proj', bitz: 4}\n", "unknown recipe keys"),
    ("defaults: {bits: 4}\n", "unknown recipe keys"),
    ("rules:\n  - {pattern: '*.in_proj', bits: 3}\n", "bits must be"),
    ("rules:\n  - {pattern: '*.in_proj', method: hqq}\n", "method must be"),
    ("rules:\n  - {pattern: '*.router'}\n", "matches no quantizable module"),
    ("rules:\n  - {bits: 8}\n", "needs a 'pattern'"),
    ("rules: [\n", "cannot parse"),
])
def test_bad_recipes(model, tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        build_plan(model, recipe=load_recipe(path))


def test_unsupported_bits_and_method(model):
    with pytest.raises(ConfigError, match="unsupported bit width"):
        build_plan(model, bits=2)
    with pytest.raises(ConfigError, match="method"):
        build_plan(model, method="smoothquant")


def test_calibration_from_files(tiny_tokenizer, calib_text_file, tmp_path):
    tok = load_tokenizer(tiny_tokenizer)
    data = load_calibration([str(calib_text_file)], tok, nsamples=4, seq_len=64)
    assert data.ids.shape == (4, 64) and data.ids.dtype == torch.int64
    again = load_calibration([str(calib_text_file)], tok, nsamples=4, seq_len=64)
    assert data.sha256 == again.sha256 and len(data.sha256) == 64
    assert data.describe()["nsamples"] == 4


def test_calibration_from_corpus_is_seeded(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    a = load_calibration(["corpus"], tok, nsamples=3, seq_len=32, seed=1)
    b = load_calibration(["corpus"], tok, nsamples=3, seq_len=32, seed=1)
    c = load_calibration(["corpus"], tok, nsamples=3, seq_len=32, seed=2)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (3, 32) and "train" in a.source
    # the windows come from the train text shipped with qmamba: every one is a piece of it
    from qmamba.data_files import load_text_spec

    shipped = tok.encode(load_text_spec("corpus:train"))
    text = " " + " ".join(map(str, shipped)) + " "
    assert all(" " + " ".join(map(str, row[5:-5].tolist())) + " " in text for row in a.ids)


def test_full_corpus_calibration_needs_the_data_dir(tiny_tokenizer, tmp_path, monkeypatch):
    from qmamba.data_files import DataError

    monkeypatch.setenv("QMAMBA_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="QMAMBA_DATA_DIR"):
        load_calibration(["full"], load_tokenizer(tiny_tokenizer), 2, 16)


def test_bad_calibration_input(tiny_tokenizer, tmp_path):
    tok = load_tokenizer(tiny_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(CalibrationDataError, match="empty"):
        load_calibration([str(empty)], tok, 2, 16)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.")
    with pytest.raises(CalibrationDataError, match="too short"):
        load_calibration([str(short)], tok, 4, 64)
    with pytest.raises(UserError, match="not found"):
        load_calibration([str(tmp_path / "missing.txt")], tok, 2, 16)
    for held_out in (["corpus:heldout"], ["full:heldout/kjv"], ["corpus", str(short)]):
        with pytest.raises(CalibrationDataError, match="only the train split"):
            load_calibration(held_out, tok, 2, 16)
    with pytest.raises(CalibrationDataError, match="vocabulary"):
        load_calibration([str(short)], tok, 1, 4, vocab_size=10)
