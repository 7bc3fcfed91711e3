"""The README's troubleshooting table says what the commands really print (issue 15: "the README's troubleshooting
lines match the messages").

Every message excerpt of the table (the backticked text of its first column) has a reproduction here; the test runs
it and matches the excerpt against the output, ``...`` standing for any text. A row added to the README without a
reproduction, a reproduction whose row was removed, or a message reworded on one side only fails the test.
Each reproduction runs in a fresh directory named by the README's placeholders (``OUT``, ``M.onnx``, ``T``), so the
excerpts are compared verbatim.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qmamba
from qmamba.cli import main

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(qmamba.__file__).parent / "assets" / "tiny-blackmamba"


def table_excerpts() -> list[str]:
    """The backticked excerpts of the first column of the README's troubleshooting table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no troubleshooting table in README.md"
    return [excerpt for row in rows for excerpt in re.findall(r"`([^`]+)`", row.split(" | ")[0])]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def copy_fixture(name: str = "m", **config_changes) -> Path:
    shutil.copytree(FIXTURE, name)
    if config_changes:
        path = Path(name) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return Path(name)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the work ran although the input was wrong")


def text_file() -> Path:
    path = Path("calib.txt")
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return path


# ---- one reproduction per excerpt: (monkeypatch) -> CliRunner result ------------------------------------------------
def _output_exists(mp):
    Path("OUT").mkdir()
    Path("OUT", "file").write_text("x")
    return cli("create", "--preset", "tiny-mamba", "-o", "OUT")


def _no_cuda_build(mp):
    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setattr(torch.version, "cuda", None)
    return cli("generate", copy_fixture(), "-n", 1, "--device", "cuda")


def _unknown_device(mp):
    return cli("generate", copy_fixture(), "-n", 1, "--device", "foo")


def _missing_gpu(mp):
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: 1)
    return cli("generate", copy_fixture(), "-n", 1, "--device", "cuda:3")


def _triton_on_cpu(mp):
    mp.delenv("TRITON_INTERPRET", raising=False)
    return cli("generate", copy_fixture(), "-n", 1, "--device", "cpu", "--backend", "triton")


def _absurd_size(mp):
    return cli("info", copy_fixture(d_model=1_000_000_000))


def _mistyped_field(mp):
    return cli("info", copy_fixture(norm_eps="x"))


def _too_little_memory(mp):
    mp.setattr("qmamba.devices.device_memory_bytes", lambda device: 8 << 30)
    mp.setattr("qmamba.checkpoints.load.loaded_bytes", lambda *args: 12 << 30)
    return cli("generate", copy_fixture(), "-n", 1, "--device", "cpu")


def _json_folder_missing(mp):
    mp.setattr("qmamba.eval.evaluate_checkpoint", _must_not_run)
    return cli("eval", copy_fixture(), "--json", "/no/such/dir/x.json")


def _zero_batch(mp):
    mp.setattr("qmamba.eval.evaluate_checkpoint", _must_not_run)
    return cli("eval", copy_fixture(), "--batch-size", 0)


def _method_for_one_bit(mp):
    return cli("quantize", copy_fixture(), "-o", "q", "--bits", 1, "--method", "awq")


def _group_size_for_int8(mp):
    return cli("quantize", copy_fixture(), "-o", "q", "--bits", 8, "--group-size", 64)


def _distill_option_alone(mp):
    return cli("quantize", copy_fixture(), "-o", "q", "--bits", 1, "--distill-steps", 5)


def _resume_other_nsamples(mp):
    Path("D").mkdir()
    torch.save({"step": 1, "elapsed": 0.0, "params": {}, "optimizer": {},
                "data": {"nsamples": 6, "seq_len": 24, "sha256": "0" * 64}}, Path("D", "distill_state.pt"))
    mp.setattr("qmamba.calib.quantize.calibrate", _must_not_run)  # refused before the calibration walk
    return cli("quantize", copy_fixture(), "-o", "q", "--bits", 1, "--distill", "--distill-checkpoint", "D",
               "--nsamples", 8, "--seq-len", 24, "--calib", text_file(), "--no-progress")


def _compare_tokenizers(mp):
    from qmamba.calib.text_data import train_bpe_tokenizer

    a, b = copy_fixture("a"), copy_fixture("b")
    train_bpe_tokenizer([text_file()], 300, b / "tokenizer.json")
    mp.setattr("qmamba.eval.evaluate_checkpoint", _must_not_run)
    return cli("eval", "--compare", a, b, "--data", text_file(), "--no-progress")


class _Result:  # a message raised by the library, shaped like a CLI result of `error: ...`
    def __init__(self, exc):
        self.exit_code, self.output = 2, f"error: {exc}\n"


def _export_without_tokenizer(mp):
    from qmamba.errors import UserError
    from qmamba.export.exporter import TOKENIZER_METADATA_KEY, export_tokenizer_file

    Path("M.onnx").write_bytes(b"")
    with pytest.raises(UserError) as caught:  # what `qmamba generate M.onnx` calls with the export's metadata
        export_tokenizer_file(Path("M.onnx"), {TOKENIZER_METADATA_KEY: ""})
    return _Result(caught.value)


def _onnx_given_as_checkpoint(mp):
    Path("M.onnx").write_bytes(b"\x08\x07")
    return cli("info", "M.onnx")


def _no_cuda_provider(mp):
    onnxruntime = pytest.importorskip("onnxruntime")
    from qmamba.checkpoints.random_init import random_state_dict
    from qmamba.config import preset
    from qmamba.export.exporter import export_model

    cfg = preset("tiny-mamba")
    export_model(cfg, random_state_dict(cfg, seed=0), {}, Path("M.onnx"))
    mp.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])  # the CPU package
    return cli("generate", "M.onnx", "--device", "cuda", "-n", "1")


def _tokenizer_too_large(mp):
    shutil.copy(FIXTURE / "tokenizer.json", "T")
    return cli("create", "--preset", "tiny-blackmamba", "-o", "c", "--tokenizer", "T")


REPRODUCTIONS = {
    "output directory OUT exists and is not empty (pass --overwrite to replace it)": _output_exists,
    "device 'cuda' requested but this torch build has no CUDA support; use --device cpu": _no_cuda_build,
    "unknown device 'foo': use cpu, cuda or cuda:N": _unknown_device,
    "device 'cuda:3' does not exist: this machine has 1 CUDA device(s)": _missing_gpu,
    "--backend triton runs on CUDA only, not on cpu; use --backend reference": _triton_on_cpu,
    "config file .../config.json: the config describes a model of 2.4e+19 parameters (...), above qmamba's limit "
    "of 1e+12": _absurd_size,
    "config file .../config.json: norm_eps must be a number in (0, 1), got 'x'": _mistyped_field,
    "the model (float32 weights) needs 12.0 GiB, more than this machine's RAM (8.0 GiB)": _too_little_memory,
    "--json /no/such/dir/x.json: directory /no/such/dir does not exist": _json_folder_missing,
    "Invalid value for '--batch-size': 0 is not in the range x>=1.": _zero_batch,
    "--method awq does not apply to --bits 1 (1-bit modules are initialised by PTB, see docs/binary.md)":
        _method_for_one_bit,
    "--group-size 64 does not apply to --bits 8 (int8 has one scale per output channel); group sizes are for "
    "4-bit": _group_size_for_int8,
    "--distill-steps only applies with --distill": _distill_option_alone,
    "distillation checkpoint .../distill_state.pt was made with --nsamples 6, this run has --nsamples 8":
        _resume_other_nsamples,
    "A and B have different tokenizers (...): their perplexities count different tokens and cannot be compared":
        _compare_tokenizers,
    "M.onnx was exported without a tokenizer: pass --tokenizer FILE": _export_without_tokenizer,
    "M.onnx is an ONNX export, not a checkpoint (run it with: qmamba generate M.onnx)": _onnx_given_as_checkpoint,
    "tokenizer T has 4096 tokens, more than the model's vocabulary of 512": _tokenizer_too_large,
    "onnxruntime ... here has no CUDA execution provider (it has: CPUExecutionProvider): install onnxruntime-gpu in "
    "place of onnxruntime (pip install 'qmamba[gpu]'), or run with --device cpu": _no_cuda_provider,
}


def excerpt_pattern(excerpt: str) -> re.Pattern:
    """The excerpt as a regular expression: verbatim, except ``...`` for any text."""
    return re.compile(".*?".join(re.escape(part) for part in excerpt.split("...")))


def test_every_table_row_has_a_reproduction():
    assert sorted(table_excerpts()) == sorted(REPRODUCTIONS)


def test_excerpt_pattern_is_strict():
    pattern = excerpt_pattern("config file .../config.json: got 'x' (0, 1)")
    assert pattern.search("error: config file m/config.json: got 'x' (0, 1)")
    assert not pattern.search("error: config file m/config.json: got 'y' (0, 1)")
    assert not pattern.search("error: config file m/config_json: got 'x' (0, 1)")


@pytest.mark.parametrize("excerpt", list(REPRODUCTIONS))
def test_readme_message_is_what_the_command_prints(excerpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = REPRODUCTIONS[excerpt](monkeypatch)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert excerpt_pattern(excerpt).search(lines[0]), (excerpt, lines[0])
    for written in ("q", "c"):  # nothing half-written by quantize / create
        assert not Path(written).exists()
