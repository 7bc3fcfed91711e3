"""quantize refuses what does not apply and records what ran (issue 15, cases 7, 10, 11, 12): options that do not
apply to the bit width are errors, zero/negative distillation values are refused before any work, the manifest
records the method that actually ran, and a resumed distillation says where it resumed, refuses other calibration
data and says when no step is left."""

import json

import pytest
from click.testing import CliRunner

from qmamba.calib.distill import DistillationError, DistillOptions
from qmamba.calib.pipeline import CalibOptions
from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
from qmamba.calib.recipe import build_plan, resolve_options
from qmamba.cli import main
from qmamba.config import preset
from qmamba.errors import ConfigError
from qmamba.model import MambaLM


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


# ---- 12: options that do not apply ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragments", [
    (["--bits", 1, "--method", "awq"], ["--method awq", "--bits 1"]),
    (["--bits", 1, "--method", "gptq"], ["--method gptq", "--bits 1"]),
    (["--bits", 8, "--group-size", 100], ["--group-size"]),
    (["--bits", 8, "--group-size", 64], ["--group-size 64", "--bits 8"]),
    (["--bits", 1, "--group-size", 64], ["--group-size 64", "--bits 1"]),
    (["--bits", 8, "--symmetric"], ["--symmetric", "--bits 8"]),
    (["--method", "rtn", "--act-order"], ["--act-order", "GPTQ"]),
    (["--bits", 4, "--distill"], ["--distill", "1-bit"]),
    (["--distill-steps", 5], ["--distill-steps", "--distill"]),
])
def test_options_that_do_not_apply(tiny_checkpoint, tmp_path, args, fragments):
    result = cli("quantize", tiny_checkpoint, "-o", tmp_path / "q", "--no-progress", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "q").exists()


def test_library_refuses_options_that_do_not_apply(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="method awq does not apply"):
        quantize_checkpoint(tiny_checkpoint, tmp_path / "q", QuantizeOptions(bits=1, method="awq"))
    with pytest.raises(ConfigError, match="group-size 64 does not apply"):
        quantize_checkpoint(tiny_checkpoint, tmp_path / "q", QuantizeOptions(bits=8, group_size=64))
    assert resolve_options(1) == {"bits": 1, "group_size": None, "symmetric": False, "method": "ptb"}
    assert resolve_options(8, method="rtn") == {"bits": 8, "group_size": None, "symmetric": True, "method": "rtn"}
    assert resolve_options(4) == {"bits": 4, "group_size": 128, "symmetric": False, "method": "gptq"}


def test_recipe_rules_that_do_not_apply():
    model = MambaLM(preset("tiny-blackmamba"))
    bad = {"rules": [{"pattern": "*.experts.*", "bits": 1, "method": "awq"}]}
    with pytest.raises(ConfigError, match=r"rules\[0\].*method 'awq' does not apply to bits 1"):
        build_plan(model, recipe=bad)
    with pytest.raises(ConfigError, match="recipe default: group_size 64 does not apply to bits 8"):
        build_plan(model, recipe={"default": {"bits": 8, "group_size": 64}})
    # inherited values do not apply and are not errors: a 1-bit rule under an AWQ default gives PTB modules
    plan = build_plan(model, method="awq", recipe={"rules": [{"pattern": "*.experts.*", "bits": 1}]})
    assert plan["layers.1.mixer.experts.fc1"].method == "ptb" and plan["layers.0.mixer.in_proj"].method == "awq"


def test_manifest_records_what_ran_for_one_bit(tiny_checkpoint, calib_text_file, tmp_path):
    out = tmp_path / "b1"
    result = cli("quantize", tiny_checkpoint, "-o", out, "--bits", 1, "--calib", calib_text_file, "--nsamples", 4,
                 "--seq-len", 24, "--no-progress", "--json", tmp_path / "run.json")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "manifest.json").read_text())["quantization_info"]
    assert (info["bits"], info["method"], info["group_size"]) == (1, "ptb", None)
    assert json.loads((tmp_path / "run.json").read_text())["method"] == "ptb"


# ---- 7, 10: distillation values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["--distill-lr", -1], "--distill-lr"), (["--distill-lr", 0], "--distill-lr"),
    (["--distill-batch", 0], "--distill-batch"), (["--distill-steps", 0], "--distill-steps"),
    (["--distill-steps", -1], "--distill-steps"), (["--distill-time", 0], "--distill-time"),
    (["--nsamples", 0], "--nsamples"), (["--seq-len", 1], "--seq-len"),
])
def test_zero_and_negative_values_are_refused(tiny_checkpoint, tmp_path, args, fragment):
    result = cli("quantize", tiny_checkpoint, "-o", tmp_path / "q", "--bits", 1, "--distill", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", -1), ("lr", -1.0), ("lr", float("nan")),
                                         ("batch_size", 0), ("time_budget", -1.0), ("temperature", 0)])
def test_distill_options_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        DistillOptions(**{field: value})


# ---- 11: honest resume ------------------------------------------------------------------------------------------
def test_distillation_resume_is_honest(tiny_checkpoint, calib_text_file, tmp_path):
    ckpt = tmp_path / "distill-state"
    lines = []

    def run(name, steps, nsamples=6, seq_len=24):
        lines.clear()
        options = QuantizeOptions(
            bits=1, calib=[str(calib_text_file)], nsamples=nsamples, seq_len=seq_len,
            calibration=CalibOptions(progress=False),
            distill=DistillOptions(steps=steps, batch_size=2, checkpoint_dir=str(ckpt), checkpoint_every=1,
                                   progress=False))
        return quantize_checkpoint(tiny_checkpoint, tmp_path / name, options, log=lines.append)

    first = run("first", 2)
    assert first["distillation"]["steps"] == 2 and not any("resumed" in line for line in lines)
    second = run("second", 4)
    assert any("resumed from step 2 of 4" in line and "2 steps to run" in line for line in lines), lines
    assert second["distillation"]["steps"] == 4 and second["distillation"]["steps_run"] == 2
    third = run("third", 3)
    assert any("resumed from step 4 of 3" in line and "0 steps to run" in line for line in lines), lines
    assert third["distillation"]["steps_run"] == 0
    entries = json.loads((tmp_path / "third" / "manifest.json").read_text())["quantization"]
    assert {e["method"] for e in entries.values()} == {"ptb+distill"}  # distilled (by the resumed checkpoint)
    with pytest.raises(DistillationError, match="--nsamples 6, this run has --nsamples 8"):
        run("other-n", 6, nsamples=8)
    with pytest.raises(DistillationError, match="--seq-len 24, this run has --seq-len 32"):
        run("other-l", 6, seq_len=32)
    assert not (tmp_path / "other-n").exists() and not (tmp_path / "other-l").exists()
