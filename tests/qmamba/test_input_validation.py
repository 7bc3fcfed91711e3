"""Bad input at the edges is a one-line error before any work (issue 15, cases 1-6, 8, 10 and the rough edges):
absurd or mistyped config values, devices and backends this machine does not have, output paths checked first,
zero/negative counts, and eval --compare of checkpoints with different tokenizers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import qmamba
from qmamba.checkpoints.random_init import create_checkpoint
from qmamba.cli import main
from qmamba.config import MAX_PARAMETERS, ModelConfig, preset
from qmamba.errors import ConfigError, UserError

FIXTURE = Path(qmamba.__file__).parent / "assets" / "tiny-blackmamba"
REPO = Path(__file__).resolve().parents[2]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Exit status 2, one line on the terminal, no traceback, and every fragment in it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.fixture
def fixture_copy(tmp_path):
    out = tmp_path / "m"
    shutil.copytree(FIXTURE, out)
    return out


def edit_config(directory: Path, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- 1, 2: config values ---------------------------------------------------------------------------------------
def test_absurd_model_size_is_refused_with_the_figure(fixture_copy):
    edit_config(fixture_copy, d_model=1_000_000_000)
    result = cli("info", fixture_copy)
    assert_one_line_error(result, "config.json", "parameters", "limit")
    count = float(re.search(r"model of ([0-9.e+]+) parameters", result.output).group(1))
    assert count > MAX_PARAMETERS
    with pytest.raises(ConfigError, match="parameters"):
        qmamba.load_model(fixture_copy)


def test_absurd_blackmamba_hidden_size(tmp_path):
    src = create_checkpoint("tiny-blackmamba", "blackmamba", tmp_path / "bm")
    cfg = json.loads((src / "config.json").read_text())
    for value, fragment in ((10_000_000_000, "parameters"), (1e10, "hidden_size"), ("64", "hidden_size")):
        (src / "config.json").write_text(json.dumps({**cfg, "hidden_size": value}))
        with pytest.raises(ConfigError, match=fragment):
            qmamba.load_model(src)


def test_parameter_count_figure_matches_the_config():
    cfg = preset("tiny-blackmamba").to_dict()
    cfg.update(d_model=2_000_000, dt_rank=None)
    expected = sum(v for k, v in _counts(cfg).items() if k != "total")
    with pytest.raises(ConfigError, match=f"{expected:.3g}".replace("+", r"\+")):
        ModelConfig(**cfg)


def _counts(cfg: dict) -> dict:
    """Parameter counts by the formula of the config's docstring, independently of ModelConfig.validate."""
    d, n, k, e = cfg["d_model"], cfg["d_state"], cfg["d_conv"], cfg["expand"]
    di, r = e * d, -(-d // 16)
    mamba = 3 * di * d + (r + 2 * n) * di + di * r + di * k + di + di + di * n + di
    n_mamba = sum(1 for c in cfg["layers"] if c == "r")
    n_moe = len(cfg["layers"]) - n_mamba
    experts = 4 * (2 * cfg["ffn_hidden"] * d + d * cfg["ffn_hidden"]) + 4 * d + 4
    return {"embedding": cfg["vocab_size"] * d, "norms": len(cfg["layers"]) * d + 2 * d,
            "mamba": n_mamba * mamba, "moe": n_moe * experts}


@pytest.mark.parametrize("fmt,preset_name,field,value", [
    ("blackmamba", "tiny-blackmamba", "swiglu", "false"), ("blackmamba", "tiny-blackmamba", "add_bias_linear", 0),
    ("mamba_ssm", "tiny-mamba", "rms_norm", "false"), ("mamba_ssm", "tiny-mamba", "tie_embeddings", None),
    ("hf", "tiny-mamba", "use_bias", "true"), ("hf", "tiny-mamba", "tie_word_embeddings", 0),
    ("hf", "tiny-mamba", "residual_in_fp32", "yes"),
])
def test_source_config_booleans_must_be_json_booleans(tmp_path, fmt, preset_name, field, value):
    """A string "false" (or 0, null) was read by truthiness: swiglu "false" loaded a gated-expert model."""
    src = create_checkpoint(preset_name, fmt, tmp_path / fmt)
    qmamba.load_model(src)  # the checkpoint as written loads
    edit_config(src, **{field: value})
    with pytest.raises(ConfigError, match=f"{field} must be true or false, got {value!r}"):
        qmamba.load_model(src)


@pytest.mark.parametrize("field,value,fragment", [
    ("norm_eps", "x", "norm_eps"), ("norm_eps", 0, "norm_eps"), ("d_state", 8.5, "d_state"),
    ("expert_gated", "yes", "expert_gated"), ("layers", "r4r4", "layers"), ("layers", ["r", "²"], "layer"),
    ("vocab_size", True, "vocab_size"), ("extra", [], "extra"),
])
def test_mistyped_config_values(fixture_copy, field, value, fragment):
    edit_config(fixture_copy, **{field: value})
    result = cli("generate", fixture_copy, "-n", 1, "--device", "cpu")
    assert_one_line_error(result, fragment)


def test_memory_demand_beyond_the_machine_is_refused(fixture_copy, tmp_path, monkeypatch):
    import qmamba.devices as devices

    monkeypatch.setattr(devices, "device_memory_bytes", lambda device: 1 << 20)  # a 1 MiB machine
    with pytest.raises(devices.DeviceError, match=r"needs 8\.\d MiB, more than this machine's RAM \(1\.0 MiB\)"):
        qmamba.load_model(fixture_copy)  # 2.1M parameters in float32: 8.x MiB
    monkeypatch.setattr(devices, "device_memory_bytes", lambda device: 1 << 16)  # 64 KiB
    with pytest.raises(devices.DeviceError, match=r"needs 938\.5 KiB, more than this machine's RAM \(64\.0 KiB"):
        create_checkpoint("tiny-blackmamba", "qmamba", tmp_path / "c", dtype="float32")
    assert not (tmp_path / "c").exists()


# ---- 3, 4: devices and backends ----------------------------------------------------------------------------------
def test_cuda_requested_without_cuda(fixture_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(cli("generate", fixture_copy, "-n", 1, "--device", "cuda"), "cuda", "--device cpu")
    assert_one_line_error(cli("eval", fixture_copy, "--device", "cuda"), "cuda")
    result = cli("quantize", fixture_copy, "-o", tmp_path / "q", "--device", "cuda", "--method", "rtn")
    assert_one_line_error(result, "cuda")
    assert not (tmp_path / "q").exists()


def test_unknown_and_missing_devices(fixture_copy, monkeypatch):
    assert_one_line_error(cli("generate", fixture_copy, "-n", 1, "--device", "foo"), "unknown device 'foo'")
    assert_one_line_error(cli("quantize", fixture_copy, "-o", fixture_copy.parent / "q", "--method", "rtn",
                              "--device", "foo"), "unknown device 'foo'")
    assert_one_line_error(cli("eval", fixture_copy, "--device", "foo"), "unknown device 'foo'")
    assert not (fixture_copy.parent / "q").exists()
    assert_one_line_error(cli("generate", fixture_copy, "-n", 1, "--device", "mps"), "not supported")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_one_line_error(cli("generate", fixture_copy, "-n", 1, "--device", "cuda:3"), "1 CUDA device")


def test_triton_backend_on_cpu(fixture_copy, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test suite runs Triton through its interpreter
    result = cli("generate", fixture_copy, "-n", 1, "--device", "cpu", "--backend", "triton")
    assert_one_line_error(result, "--backend triton", "CUDA")


@pytest.mark.parametrize("command", [["create", "--preset", "tiny-mamba", "-o", "OUT"],
                                     ["generate", FIXTURE, "-n", 1, "--device", "cpu"],
                                     ["quantize", FIXTURE, "-o", "OUT", "--method", "rtn"]])
def test_seed_out_of_range(command, tmp_path, monkeypatch):
    """torch generators take seeds below 2**64: a larger --seed was an OverflowError traceback."""
    monkeypatch.chdir(tmp_path)
    for seed in (2**64 + 1, -1):
        assert_one_line_error(cli(*command, "--seed", seed), "--seed")
    assert not (tmp_path / "OUT").exists()


# ---- 5, 6, 10: eval options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["--batch-size", 0], "--batch-size"), (["--lambada", "--lambada-limit", -1], "--lambada-limit"),
    (["--lambada", "--lambada-limit", 0], "--lambada-limit"), (["--max-tokens", 0], "--max-tokens"),
    (["--stride", 0], "--stride"), (["--seq-len", 1], "--seq-len"), (["--stride", 600], "--stride"),
])
def test_eval_rejects_zero_and_negative_counts(fixture_copy, monkeypatch, args, fragment):
    monkeypatch.setattr("qmamba.eval.evaluate_checkpoint", _must_not_run)
    assert_one_line_error(cli("eval", fixture_copy, *args), fragment)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the evaluation ran although an option was invalid")


def test_library_rejects_zero_and_negative_counts(tmp_path):
    from qmamba.eval import encode_text_spec, load_lambada, perplexity
    from qmamba.tokenizer import load_tokenizer

    model = qmamba.load_model(FIXTURE)
    ids = torch.arange(100) % 50
    with pytest.raises(UserError, match="stride"):
        perplexity(model, ids, seq_len=16, stride=0, progress=False)
    with pytest.raises(UserError, match="batch size"):
        perplexity(model, ids, seq_len=16, batch_size=0, progress=False)
    lambada = tmp_path / "l.jsonl.gz"
    import gzip

    with gzip.open(lambada, "wt") as f:
        f.write("\n".join(json.dumps({"context": "a", "continuation": str(i)}) for i in range(5)))
    assert len(load_lambada(lambada, 2)) == 2 and len(load_lambada(lambada)) == 5
    for bad in (-1, 0):
        with pytest.raises(UserError, match="positive"):
            load_lambada(lambada, bad)
    text = tmp_path / "t.txt"
    text.write_text("some words for the tokenizer " * 10)
    tok = load_tokenizer(FIXTURE / "tokenizer.json")  # a TextTokenizer, as resolve_tokenizer gives
    assert len(encode_text_spec(tok, str(text), 7)) == 7
    with pytest.raises(UserError, match="positive"):
        encode_text_spec(tok, str(text), 0)


def test_json_path_is_checked_before_the_evaluation(fixture_copy, tmp_path, monkeypatch):
    monkeypatch.setattr("qmamba.eval.evaluate_checkpoint", _must_not_run)
    assert_one_line_error(cli("eval", fixture_copy, "--json", tmp_path / "nowhere" / "x.json"), "does not exist")
    assert_one_line_error(cli("eval", fixture_copy, "--json", tmp_path), "directory")
    monkeypatch.setattr("qmamba.cli.generate.generate_text", _must_not_run)
    assert_one_line_error(cli("generate", fixture_copy, "--json", tmp_path / "nowhere" / "g.json"), "does not exist")
    monkeypatch.setattr("qmamba.calib.quantize.quantize_checkpoint", _must_not_run)
    result = cli("quantize", fixture_copy, "-o", tmp_path / "q", "--method", "rtn", "--json",
                 tmp_path / "nowhere" / "q.json")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "q").exists()
    monkeypatch.setattr("qmamba.bench.bench_model", _must_not_run)
    assert_one_line_error(cli("bench", fixture_copy, "--json", tmp_path / "nowhere" / "b.json"), "does not exist")


def test_unwritable_output_folder_is_refused_before_the_work(fixture_copy, tmp_path, monkeypatch):
    """An output folder that cannot be written (permissions, a read-only file system) was found only when the
    result was saved, after the whole run, with a traceback."""
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == locked.resolve():
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr("qmamba.calib.quantize.calibrate", _must_not_run)
    for args in (["quantize", fixture_copy, "-o", locked / "q", "--method", "rtn"],
                 ["create", "--preset", "tiny-mamba", "-o", locked / "c"],
                 ["export", fixture_copy, "-o", locked / "m.onnx"],
                 ["eval", fixture_copy, "--json", locked / "e.json"],
                 ["generate", fixture_copy, "-n", 1, "--json", locked / "g.json"]):
        assert_one_line_error(cli(*args), f"cannot write in {locked} (Permission denied)")
    assert list(locked.iterdir()) == []


def test_eval_default_token_budget(fixture_copy, tmp_path, monkeypatch):
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        return {"path": str(path), "perplexity": {"ppl": 2.0, "data": "x", "tokens": 10, "text_tokens": 99,
                                                  "max_tokens": kwargs["max_tokens"], "seq_len": 8, "stride": 8}}

    monkeypatch.setattr("qmamba.eval.evaluate_checkpoint", fake)
    result = cli("eval", fixture_copy)
    assert result.exit_code == 0 and seen["max_tokens"] == 32768
    result = cli("eval", fixture_copy, "--max-tokens", "all")
    assert result.exit_code == 0 and seen["max_tokens"] is None


def test_eval_says_what_the_budget_left_out(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    result = cli("eval", FIXTURE, "--data", text, "--max-tokens", 100, "--seq-len", 32, "--no-progress")
    assert result.exit_code == 0, result.output
    from qmamba.tokenizer import load_tokenizer

    total = len(load_tokenizer(FIXTURE / "tokenizer.json").encode(text.read_text()))
    assert f"the first 100 of {total}" in result.output and "--max-tokens all" in result.output


# ---- 8: eval --compare with two tokenizers -----------------------------------------------------------------------
@pytest.fixture
def other_tokenizer_copy(tmp_path):
    from qmamba.calib.text_data import train_bpe_tokenizer

    out = tmp_path / "other"
    shutil.copytree(FIXTURE, out)
    text = tmp_path / "words.txt"
    text.write_text("an entirely different tokenizer trained on other words " * 40)
    train_bpe_tokenizer([text], 300, out / "tokenizer.json")
    return out


def test_compare_refuses_different_tokenizers(other_tokenizer_copy, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    result = cli("eval", "--compare", FIXTURE, other_tokenizer_copy, "--data", text, "--seq-len", 32,
                 "--no-progress")
    assert_one_line_error(result, "different tokenizers", "--tokenizer")
    # with one tokenizer for both (explicit), the comparison runs and both are scored on the same tokens
    result = cli("eval", "--compare", FIXTURE, other_tokenizer_copy, "--data", text, "--seq-len", 32,
                 "--tokenizer", FIXTURE / "tokenizer.json", "--no-progress", "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["a"]["perplexity"]["tokens"] == data["b"]["perplexity"]["tokens"]
    assert data["delta"]["ppl"] == pytest.approx(0.0)  # the same weights, the same tokens


# ---- rough edges -----------------------------------------------------------------------------------------------
def test_overwrite_message_names_the_option(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_line_error(cli("create", "--preset", "tiny-mamba", "-o", tmp_path / "full"), "--overwrite")


def test_generate_zero_tokens_prints_no_nan(fixture_copy, tmp_path):
    result = cli("generate", fixture_copy, "-n", 0, "--device", "cpu", "--json", tmp_path / "g.json")
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower() and "no tokens generated" in result.output
    assert json.loads((tmp_path / "g.json").read_text())["tokens_per_s"] is None


def test_generate_json_holds_the_streamed_text(fixture_copy, tmp_path):
    result = cli("generate", fixture_copy, "--prompt", "And the", "-n", 8, "-t", 0, "--device", "cpu",
                 "--json", tmp_path / "g.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "g.json").read_text())
    assert result.stdout == "And the" + record["text"] + "\n"
    assert record["new_tokens"] == 8 and record["prompt"] == "And the"
    assert (record["device"], record["dtype"], record["backend"]) == ("cpu", "float32", "reference")  # what ran


def test_ctrl_c_during_generate_starts_a_new_line(fixture_copy, monkeypatch):
    def interrupted_generate(model, input_ids, max_new_tokens, *, stream, **kwargs):
        for token in (100, 200, 300):
            stream(torch.tensor([token]))
        raise KeyboardInterrupt

    monkeypatch.setattr("qmamba.generation.generate", interrupted_generate)
    result = cli("generate", fixture_copy, "--prompt", "Hello", "--device", "cpu")
    assert result.exit_code == 130
    assert result.stdout.startswith("Hello") and result.stdout.endswith("\n")
    assert result.stderr == "interrupted\n"


@pytest.mark.parametrize("command", [["info"], ["eval"], ["quantize", "-o", "out"], ["bench"],
                                     ["export", "-o", "out.onnx"]])
def test_checkpoint_commands_on_an_onnx_file(tmp_path, command):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    result = cli(command[0], onnx, *command[1:])
    assert_one_line_error(result, "ONNX export", "qmamba generate", command[0])


def test_create_checks_the_tokenizer_against_the_preset(tmp_path):
    result = cli("create", "--preset", "tiny-blackmamba", "-o", tmp_path / "c", "--tokenizer",
                 FIXTURE / "tokenizer.json")  # 4096 tokens, the preset has 512
    assert_one_line_error(result, "4096 tokens", "512")
    assert not (tmp_path / "c").exists()
    result = cli("create", "--preset", "tiny-blackmamba-fixture", "-o", tmp_path / "c", "--tokenizer",
                 FIXTURE / "tokenizer.json")
    assert result.exit_code == 0, result.output


def test_every_option_has_help():
    missing = []
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, missing


def test_bits_and_group_size_list_their_values():
    result = cli("quantize", "--help")
    assert "[1|4|8]" in result.output and "[16|32|64|128|256]" in result.output


def test_readme_top_k_matches_the_default():
    from qmamba.cli.generate import generate

    default = next(p.default for p in generate.params if p.name == "top_k")
    shown = re.findall(r"--top-k (\d+)", (REPO / "README.md").read_text())
    assert shown and all(int(v) == default for v in shown), (shown, default)


def test_assets_reachable_from_the_package():
    """``import qmamba`` alone gives ``qmamba.assets`` (checked in a fresh interpreter: in this one, other imports
    have loaded the submodule already)."""
    import subprocess
    import sys

    code = "import qmamba; print(qmamba.assets.default_model_path())"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == FIXTURE.resolve()


def test_fallback_summary_is_short():
    from qmamba.calib.report import format_fallbacks, format_table

    records = [f"layers.{i}.mixer.experts.fc{w}[{e}]:all-tokens" for i in range(1, 72, 2) for w in (1, 2)
               for e in range(8)]
    lines = format_fallbacks(records)
    assert len(lines) <= 10 and max(map(len, lines)) < 120
    assert f"fallbacks: {len(records)} (all-tokens {len(records)}) in 72 module(s):" == lines[0]
    assert "64 more module(s)" in lines[-1]
    row = {"kind": "experts", "format": "int4", "method": "gptq", "modules": 1, "bits_per_weight": 4.0,
           "bytes_before": 10, "bytes_after": 5, "sqnr_db": 20.0, "fallbacks": records}
    assert max(map(len, format_table([row]).splitlines())) < 120


@pytest.mark.parametrize("command", [["generate", FIXTURE, "-n", 1, "--device", "cpu"],
                                     ["generate", FIXTURE, "-n", 1, "--backend", "reference"],
                                     ["eval", FIXTURE],
                                     ["eval", FIXTURE, "--device", "cuda", "--backend", "reference"],
                                     ["bench", FIXTURE, "--device", "cpu"]])
def test_int8_activations_need_cuda_and_triton(command, monkeypatch):
    """``--int8-activations`` runs the W4A8 prefill kernels: on the CPU or the reference backend it is a one-line
    error before any work, not a switch that silently does nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(cli(*command, "--int8-activations"), "--int8-activations", "CUDA")


def test_int8_activations_on_an_onnx_path_points_to_the_export_option(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    assert_one_line_error(cli("generate", onnx, "--int8-activations"), "--accuracy-level")


def test_int8_activations_scope_sets_and_restores_the_policy():
    from qmamba.kernels.matmul_configs import W4A8_PREFILL_MIN_M, current_policy, int8_activations

    before = current_policy()
    with int8_activations() as policy:
        assert current_policy() is policy and policy.w4a8_min_m == W4A8_PREFILL_MIN_M
        assert policy.w4a8_tile == before.w4a8_tile and not policy.w4a8_dense  # only the threshold changes
    with int8_activations(False) as policy:
        assert policy is before
    assert current_policy() is before and before.w4a8_min_m == 0
