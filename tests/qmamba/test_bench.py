"""``qmamba bench`` (CPU, reference path): checked figures for each batch size, JSON rows; a decode path whose
tokens differ from the reference path's is an error with no figure."""

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import qmamba
from qmamba import bench as bench_lib
from qmamba.cli import main

FIXTURE = Path(__file__).resolve().parents[2] / "qmamba" / "assets" / "tiny-blackmamba"


def test_bench_cli_reports_checked_rows(tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(FIXTURE), "--batch", "1,2", "--prompt-len", "12", "--tokens", "4",
                                    "--check-tokens", "3", "--json", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["check"].startswith("ok (3 tokens")
        assert r["decode_ms_per_token"] > 0 and r["prefill_tok_s"] > 0
        assert abs(r["decode_tok_s"] - r["batch"] * 1e3 / r["decode_ms_per_token"]) < 1e-6
    assert "decode ms/tok" in res.output


def test_bench_refuses_a_path_that_disagrees_with_the_reference():
    model = qmamba.load_model(FIXTURE)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8))
    _, state = model.prefill(prompt)

    def wrong_step(ids, st):  # a "fast path" that always predicts the reference's least likely token
        return -model.step(ids, st, check=False)

    try:
        bench_lib.check_decode(model, wrong_step, prompt, state, 3)
    except bench_lib.BenchCheckError as exc:
        assert "no figure reported" in str(exc)
    else:
        raise AssertionError("a disagreeing decode path passed the check")
    # the correct path passes the same check
    assert bench_lib.check_decode(model, lambda i, s: model.step(i, s, check=False), prompt, state, 3).startswith("ok")


def test_bench_cli_exits_nonzero_on_failed_check(monkeypatch):
    def failing(*args, **kwargs):
        raise bench_lib.BenchCheckError("decode check failed: ...; no figure reported")

    monkeypatch.setattr(bench_lib, "check_decode", failing)
    res = CliRunner().invoke(main, ["bench", str(FIXTURE), "--prompt-len", "4", "--tokens", "2", "--device", "cpu"])
    assert res.exit_code == 1
    assert "no figure reported" in res.output


def test_bench_checks_a_bf16_model_on_its_float32_twin(tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(FIXTURE), "--prompt-len", "6", "--tokens", "2", "--check-tokens", "2",
                                    "--dtype", "bfloat16", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dtype"] == "bfloat16" and row["check"].endswith("checked in float32")
