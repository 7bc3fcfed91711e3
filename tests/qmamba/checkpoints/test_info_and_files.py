"""``qmamba info`` reads metadata only (safetensors headers, memory-mapped pickles) and still agrees with a full
read; a large weights file announces itself while it loads; a missing relative path is "does not exist", not a
download; written checkpoints get ordinary file modes (0644 under umask 022, following the umask)."""

import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

import qmamba.checkpoints.files as files
from qmamba.checkpoints.detect import FORMATS, read_checkpoint
from qmamba.checkpoints.load import load_model
from qmamba.checkpoints.native import save_checkpoint
from qmamba.checkpoints.random_init import create_checkpoint
from qmamba.checkpoints.summary import checkpoint_summary
from qmamba.cli import main

CASES = [("tiny-blackmamba", "blackmamba"), ("tiny-mamba", "mamba_ssm"), ("tiny-mamba", "hf"),
         ("tiny-blackmamba", "qmamba")]


@pytest.mark.parametrize("name,fmt", CASES)
def test_info_reads_no_tensor_data(tmp_path, monkeypatch, name, fmt):
    path = create_checkpoint(name, fmt, tmp_path / fmt, seed=0)
    cfg, sd, _ = read_checkpoint(path)  # the reference: a full read, before the readers are forbidden
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for t in sd.values()}
    full_bytes = sum(t.numel() * t.element_size() for t in unique.values())

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a reader loaded every tensor")

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(files, "safetensors_load", refuse)
    for module in FORMATS.values():
        monkeypatch.setattr(module, "read", refuse)
    summary = checkpoint_summary(path)
    assert all(loads) and (len(loads) == 1) == (fmt in ("blackmamba", "mamba_ssm"))  # pickles: mmap=True only
    assert summary["parameters"] == cfg.parameter_counts() and summary["format"] == fmt
    assert sum(summary["bytes_by_dtype"].values()) == full_bytes


def test_info_still_names_a_bad_shape_without_loading(tmp_path):
    path = create_checkpoint("tiny-mamba", "hf", tmp_path / "hf", seed=0)
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    sd["backbone.layers.1.mixer.dt_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(path / "model.safetensors"))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 2 and "backbone.layers.1.mixer.dt_proj.weight" in result.output


def test_large_weights_file_is_announced(tmp_path, monkeypatch, capsys):
    path = create_checkpoint("tiny-blackmamba", "blackmamba", tmp_path / "bm", seed=0)
    load_model(path)
    assert "loading" not in capsys.readouterr().err  # small: silent
    monkeypatch.setattr(files, "LOAD_MESSAGE_BYTES", 1000)
    load_model(path)
    err = capsys.readouterr().err
    assert f"loading {path / 'pytorch_model.bin'} (" in err and err.strip().endswith("B) ...")


def test_missing_relative_path_is_not_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = CliRunner().invoke(main, ["info", "runs/q4"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: checkpoint path does not exist: runs/q4"


def modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_get_ordinary_modes(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        native = create_checkpoint("tiny-blackmamba", "qmamba", tmp_path / "native", seed=0)  # safetensors
        pickle = create_checkpoint("tiny-blackmamba", "blackmamba", tmp_path / "bm", seed=0)
        cfg, sd, _ = read_checkpoint(native)
        saved = save_checkpoint(sd, cfg, tmp_path / "saved", tokenizer_file=None)
    finally:
        os.umask(old)
    for root in (native, pickle, saved):
        found = modes(root)
        assert found.pop(".") == dir_mode
        assert found and set(found.values()) == {file_mode}, found
    assert json.loads((saved / "manifest.json").read_text())["format"] == "qmamba"


@pytest.mark.parametrize("command", [["info"], ["generate", "--prompt", "x"], ["eval"], ["quantize", "-o", "out"],
                                     ["export", "-o", "m.onnx"], ["bench"]])
def test_every_command_says_a_missing_relative_path_does_not_exist(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = CliRunner().invoke(main, [command[0], "runs/q4", *command[1:]])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == "error: checkpoint path does not exist: runs/q4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written


def test_cli_outputs_follow_the_umask(tmp_path):
    """quantize (directory and --json file) and export (.onnx and its tokenizer) under umask 027: group-readable,
    not world-readable, like any file the user writes; nothing private to the owner (0600) as mkstemp would make."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dataclasses import replace

    from qmamba.config import preset

    src = create_checkpoint(replace(preset("tiny-blackmamba"), vocab_size=50304), "blackmamba", tmp_path / "bm",
                            seed=0)  # NeoX-sized vocabulary: the shipped tokenizer travels with every output
    old = os.umask(0o027)
    try:
        runner = CliRunner()
        result = runner.invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn",
                                      "--group-size", "32", "--no-progress", "--json", str(tmp_path / "q.json")])
        assert result.exit_code == 0, result.output
        (tmp_path / "e").mkdir()
        result = runner.invoke(main, ["export", str(tmp_path / "q"), "-o", str(tmp_path / "e" / "m.onnx")])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    found = modes(tmp_path / "q")
    assert found.pop(".") == 0o750 and "tokenizer.json" in found and set(found.values()) == {0o640}, found
    assert stat.S_IMODE((tmp_path / "q.json").stat().st_mode) == 0o640
    exported = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").iterdir()}
    assert "m.onnx" in exported and "m.tokenizer.json" in exported and set(exported.values()) == {0o640}, exported
