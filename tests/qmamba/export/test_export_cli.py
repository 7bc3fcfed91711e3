"""`qmamba export` and `qmamba generate MODEL.onnx` end to end, and the error paths: unsupported configs and
formats, bad options, existing outputs, a failing checker (nothing half-written), missing onnx/onnxruntime."""

import sys

import pytest
import torch
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export_helpers import rel_err, tiny_state_dict, torch_model  # noqa: E402

from qmamba.checkpoints.native import save_checkpoint  # noqa: E402
from qmamba.cli import main  # noqa: E402
from qmamba.config import ModelConfig  # noqa: E402
from qmamba.errors import ConfigError, UserError  # noqa: E402
from qmamba.export.exporter import ExportDependencyError, ExportError, export_model  # noqa: E402
from qmamba.export.ort_runner import OrtLM  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    cfg, sd = tiny_state_dict("tiny-mamba")
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(sd, cfg, out)
    return out


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_export_writes_checked_model_and_summary(tmp_path, checkpoint_dir):
    code, output = run("export", checkpoint_dir, "-o", tmp_path / "m.onnx", "--scan", "scan", "--opset", 22)
    assert code == 0, output
    assert "qmamba::SelectiveScan x3" in output and "MiB" in output and "scan=scan" in output
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert any(f.domain == "qmamba" and f.name == "SelectiveScan" for f in model.functions)
    assert {o.domain: o.version for o in model.opset_import}[""] == 22
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporaries, no data file


def test_cli_export_external_data_runs(tmp_path, checkpoint_dir):
    code, output = run("export", checkpoint_dir, "-o", tmp_path / "m.onnx", "--external-data", "always")
    assert code == 0, output
    assert (tmp_path / "m.onnx.data").is_file()
    cfg, sd = tiny_state_dict("tiny-mamba")
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits, _ = OrtLM(tmp_path / "m.onnx").prefill(ids)
    assert rel_err(logits, torch_model(cfg, sd)(ids)) <= 1e-4


def test_cli_refuses_to_overwrite_without_flag(tmp_path, checkpoint_dir):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    code, output = run("export", checkpoint_dir, "-o", out)
    assert code == 2 and "--overwrite" in output and out.read_bytes() == b"keep me"
    code, output = run("export", checkpoint_dir, "-o", out, "--overwrite")
    assert code == 0 and out.stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--opset", "27"], "opset 27 is not supported"),
    (["--opset", "13"], "opset 13 is not supported"),
])
def test_cli_bad_options(tmp_path, checkpoint_dir, args, message):
    code, output = run("export", checkpoint_dir, "-o", tmp_path / "m.onnx", *args)
    assert code == 2 and message in output and not (tmp_path / "m.onnx").exists()


def test_cli_missing_checkpoint_and_bad_suffix(tmp_path, checkpoint_dir):
    code, output = run("export", tmp_path / "nope", "-o", tmp_path / "m.onnx")
    assert code == 2 and "does not exist" in output
    code, output = run("export", checkpoint_dir, "-o", tmp_path / "m.bin")
    assert code == 2 and ".onnx" in output


def test_unsupported_config_gives_clear_error(tmp_path):
    cfg = ModelConfig(d_model=32, layers=["4", "4"], vocab_size=64, ffn_hidden=48, d_state=4)
    with pytest.raises(ConfigError, match="without Mamba layers"):
        export_model(cfg, {}, {}, tmp_path / "m.onnx")
    cfg = ModelConfig(d_model=32, layers=["r"], vocab_size=64, d_conv=1)
    with pytest.raises(ConfigError, match="d_conv=1"):
        export_model(cfg, {}, {}, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_weight_format_gives_clear_error(tmp_path, monkeypatch):
    from qmamba.quant import formats

    cfg, sd = tiny_state_dict("tiny-mamba")

    @formats.register_format("fake2bit")
    class Fake2Bit(formats.Int8Format):
        pass

    monkeypatch.setitem(formats.FORMATS, "fake2bit", Fake2Bit)
    manifest = {"quantization": {"layers.0.mixer.in_proj": {"format": "fake2bit"}}}
    with pytest.raises(ConfigError, match="fake2bit.*does not support"):
        export_model(cfg, sd, manifest, tmp_path / "m.onnx")


def test_checker_failure_leaves_nothing(tmp_path, monkeypatch):
    cfg, sd = tiny_state_dict("tiny-mamba")

    def failing_check(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    with pytest.raises(ExportError, match="simulated checker failure"):
        export_model(cfg, sd, {}, tmp_path / "m.onnx", external_data="always")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_gives_clear_message(tmp_path, monkeypatch):
    cfg, sd = tiny_state_dict("tiny-mamba")
    path = export_model(cfg, sd, {}, tmp_path / "m.onnx").path
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now raises ImportError
    with pytest.raises(ExportDependencyError, match="onnxruntime.*pip install"):
        OrtLM(path)
    code, output = run("generate", path, "--prompt", "x", "-n", "2", "--tokenizer", tmp_path / "none.json")
    assert code == 2 and "error:" in output and "Traceback" not in output


def test_missing_onnx_gives_clear_message(tmp_path, checkpoint_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    for name in [m for m in sys.modules if m.startswith("qmamba.export.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(sys.modules["qmamba.export"], "exporter", raising=False)
    monkeypatch.delattr(sys.modules["qmamba.export"], "graph", raising=False)
    code, output = run("export", checkpoint_dir, "-o", tmp_path / "m.onnx")
    assert code == 2 and "'onnx'" in output and "pip install" in output


def test_runner_rejects_other_models_and_bad_ids(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "o.onnx")
    with pytest.raises(UserError, match="not a qmamba export"):
        OrtLM(tmp_path / "o.onnx")
    with pytest.raises(UserError, match="not found"):
        OrtLM(tmp_path / "missing.onnx")
    cfg, sd = tiny_state_dict("tiny-mamba")
    lm = OrtLM(export_model(cfg, sd, {}, tmp_path / "m.onnx").path)
    with pytest.raises(UserError, match="token ids must be in"):
        lm.prefill(torch.tensor([[0, cfg.vocab_size]]))


def test_cli_generate_onnx_streams_text(tmp_path):
    """A tiny model with the GPT-NeoX vocabulary and no tokenizer.json: the export puts the NeoX tokenizer shipped
    with qmamba beside the .onnx file; same text as the torch path."""
    from qmamba.checkpoints.random_init import random_state_dict
    from qmamba.tokenizer import NEOX_TOKENIZER_FILE

    cfg = ModelConfig(d_model=32, layers=["r", "4"], vocab_size=50304, ffn_hidden=32, d_state=4,
                      final_norm="layernorm")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_state_dict(cfg, seed=1), cfg, ckpt)
    code, output = run("export", ckpt, "-o", tmp_path / "out" / "m.onnx")
    assert code == 2 and "does not exist" in output
    (tmp_path / "out").mkdir()
    code, output = run("export", ckpt, "-o", tmp_path / "out" / "m.onnx")
    assert code == 0 and (tmp_path / "out" / "m.tokenizer.json").read_bytes() == NEOX_TOKENIZER_FILE.read_bytes()
    args = ["generate", "--prompt", "Hello world", "-n", "6", "--temperature", "0"]
    onnx_run = CliRunner().invoke(main, args + [str(tmp_path / "out" / "m.onnx")])
    assert onnx_run.exit_code == 0, onnx_run.output
    torch_run = CliRunner().invoke(main, args + [str(ckpt), "--device", "cpu"])
    assert torch_run.exit_code == 0, torch_run.output
    assert "GPT-NeoX-20B" in torch_run.stderr and "GPT-NeoX-20B" not in onnx_run.stderr  # beside the .onnx now
    assert onnx_run.stdout.startswith("Hello world") and onnx_run.stdout == torch_run.stdout


def test_cli_generate_onnxruntime_backend_needs_an_exported_file(checkpoint_dir):
    code, output = run("generate", checkpoint_dir, "--backend", "onnxruntime", "--prompt", "x", "-n", "2")
    assert code == 2 and "qmamba export" in output
