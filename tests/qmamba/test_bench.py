"""``qmamba bench`` (CPU, reference path): checked figures for each batch size, JSON rows; a decode path whose
tokens differ from the reference path's is an error with no figure."""

import json
from pathlib import Path

import pytest
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
        assert r["check"].startswith("ok (3 tokens") and r["prefill_path"] == "eager"
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
    assert row["dtype"] == "bfloat16" and "checked in float32" in row["check"]


def _fake_gpu(monkeypatch, used_gib: float, reserved_gib: float):
    """A GPU of 100 GiB with ``used_gib`` in use device-wide, ``reserved_gib`` of it by this process's torch."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int((100 - used_gib) * gib), 100 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: int(reserved_gib * gib))


def test_foreign_gpu_bytes_counts_memory_other_processes_hold(monkeypatch):
    from qmamba.devices import CUDA_CONTEXT_ALLOWANCE, foreign_gpu_bytes

    assert foreign_gpu_bytes("cpu") == 0
    _fake_gpu(monkeypatch, used_gib=3.5, reserved_gib=3.0)   # 0.5 GiB beyond torch's: this process's context
    assert foreign_gpu_bytes("cuda") == 0
    _fake_gpu(monkeypatch, used_gib=9.0, reserved_gib=3.0)   # 6 GiB beyond torch's: another process
    assert foreign_gpu_bytes("cuda") == 6 * 2 ** 30 - CUDA_CONTEXT_ALLOWANCE


def test_benchmarks_refuse_to_time_beside_another_process(monkeypatch, capsys):
    import sys

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        from timing import require_idle_gpu
    finally:
        sys.path.pop(0)
    monkeypatch.delenv("QMAMBA_ALLOW_SHARED_GPU", raising=False)
    _fake_gpu(monkeypatch, used_gib=1.0, reserved_gib=0.5)
    require_idle_gpu()                                        # alone on the GPU: goes on
    _fake_gpu(monkeypatch, used_gib=40.0, reserved_gib=0.0)
    with pytest.raises(SystemExit) as exc:
        require_idle_gpu()
    assert "held by other processes" in str(exc.value.code)
    monkeypatch.setenv("QMAMBA_ALLOW_SHARED_GPU", "1")
    require_idle_gpu()                                        # explicitly allowed: a warning, no exit
    assert "not results" in capsys.readouterr().err


def test_bench_warns_when_the_gpu_is_shared(monkeypatch):
    lines = []
    monkeypatch.setattr(bench_lib, "foreign_gpu_bytes", lambda device: 5 * 2 ** 30)
    model = qmamba.load_model(FIXTURE)
    bench_lib.bench_model(model, [1], prompt_len=4, tokens=2, check_tokens=0, log=lines.append)
    assert any(line.startswith("warning: 5.0 GiB") and "other processes" in line for line in lines)


def test_prefill_check_passes_the_chunked_prefill_and_refuses_a_wrong_one():
    """``--prefill graph`` is checked before it is timed: the chunk loop (eager on CPU, the loop that replays the
    graphs on CUDA) passes; a prefill whose next token or state differs from the eager prefill's is refused."""
    from qmamba.graph_prefill import GraphPrefill

    model = qmamba.load_model(FIXTURE)
    prompt = torch.randint(0, model.config.vocab_size, (2, 23))
    chunked = GraphPrefill(model, max_chunk=8, min_chunk=4, capture=False)
    assert bench_lib.check_prefill(model, chunked, prompt).startswith("ok (2 rows")

    class Negated:  # the least likely next token
        def prefill(self, ids):
            logits, state = chunked.prefill(ids)
            return -logits, state

    class StaleState:  # right logits, the state of another prompt
        def prefill(self, ids):
            logits, _ = chunked.prefill(ids)
            return logits, chunked.prefill(ids.flip(1))[1]

    for wrong, what in ((Negated(), "next token"), (StaleState(), "final state")):
        try:
            bench_lib.check_prefill(model, wrong, prompt)
        except bench_lib.BenchCheckError as exc:
            assert what in str(exc) and "no figure reported" in str(exc)
        else:
            raise AssertionError(f"a prefill with a wrong {what} passed the check")


def test_bench_prefill_graph_needs_cuda():
    res = CliRunner().invoke(main, ["bench", str(FIXTURE), "--prefill", "graph", "--device", "cpu"])
    assert res.exit_code == 2 and "needs a CUDA device" in res.output


def test_prefill_is_checked_against_the_reference_backend(monkeypatch, device):
    """The eager prefill that ``qmamba bench`` times is checked against the reference backend's prefill of the same
    prompt: the Triton backend (interpreted on the CPU, compiled on the GPU) passes; one whose next token or final
    state differs is refused; a model on the reference backend is its own reference and says so."""
    model = qmamba.load_model(FIXTURE, device=device, dtype="float32", backend="reference")
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), device=device)
    assert bench_lib.check_prefill_reference(model, prompt) == "reference path"
    model.set_backend("triton")
    assert bench_lib.check_prefill_reference(model, prompt).startswith("ok (2 rows")
    assert bench_lib._backend(model) == "triton"  # the check put the backend back
    # wrong timed prefills: the first call of a check is the timed path's, the second the reference's (the model
    # stays on the reference backend here, so only the check's logic is exercised, quickly)
    model.set_backend("reference")
    monkeypatch.setattr(bench_lib, "_backend", lambda m: "triton")
    real = model.prefill

    def wrong_first(fault):
        calls = []

        def prefill(ids, **kw):
            calls.append(1)
            logits, state = real(ids, **kw)
            if len(calls) % 2 == 0:
                return logits, state
            return (-logits, state) if fault == "next token" else (logits, real(ids.flip(1), **kw)[1])
        return prefill

    for what in ("next token", "final state"):
        monkeypatch.setattr(model, "prefill", wrong_first(what))
        try:
            bench_lib.check_prefill_reference(model, prompt)
        except bench_lib.BenchCheckError as exc:
            assert what in str(exc) and "no figure reported" in str(exc)
        else:
            raise AssertionError(f"a prefill with a wrong {what} passed the check")


@pytest.mark.parametrize("int8_rows", [False, True])
def test_reference_twin_rounds_as_the_w4a8_prefill_when_the_model_does(int8_rows, monkeypatch):
    """A model whose prefill runs on int8 activations is checked against the reference twin of that (its experts'
    ``int8_inputs`` on inside the reference block, restored after), and its batched steps' fc1 rounded where the
    device's fused step does that (``int8_step_fc1``, ``DecodePolicy.int8_rows``); any other model against the plain
    reference."""
    import dataclasses

    from qmamba.config import preset
    from qmamba.kernels.decode_policy import DecodePolicy
    from qmamba.quant.formats import Int4Format
    from qmamba.quant.modules import QuantExperts
    from qmamba.testing import quantize_rtn, random_model

    model = quantize_rtn(random_model(preset("tiny-blackmamba"), "cpu"), Int4Format(32))
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    default = DecodePolicy.for_device
    monkeypatch.setattr(DecodePolicy, "for_device", classmethod(
        lambda cls, device: dataclasses.replace(default(device), int8_rows=int8_rows)))
    for flag in (False, True):
        model.int8_activations = flag
        with bench_lib._reference_backend(model):
            assert all(m.int8_inputs is flag for m in experts) and all(m.backend == "reference" for m in experts)
            assert all(m.int8_step_fc1 is (flag and int8_rows) for m in experts)
        assert not any(m.int8_inputs or m.int8_step_fc1 for m in experts)


@pytest.mark.parametrize("fc2", [False, True])
@torch.no_grad()
def test_decode_check_of_int8_rows_falls_back_to_the_steps_own_codes(fc2, monkeypatch, device):
    """A fused step that runs fc1 (with ``fc2``: fc2 too) on int8 codes (``DecodePolicy.int8_rows``,
    ``int8_rows_fc2``): where its picks fail against the reference twin that rounds its own inputs (stood in for here
    by a reference that always disagrees), the check records the codes the step multiplied and passes when the twin
    fed those codes picks as the step does; a step whose picks are wrong fails that too, and a step that runs no
    int8 rows fails at once (nothing recorded). On CUDA the step is the CUDA-graph decoder ``qmamba bench`` times,
    its capture recording the codes its replays write; on the CPU the eager fused step (interpreted kernels)."""
    import dataclasses

    from qmamba.config import preset
    from qmamba.fused_step import FusedDecodeStep
    from qmamba.kernels.decode_policy import DecodePolicy
    from qmamba.quant.formats import Int4Format
    from qmamba.quant.modules import QuantExperts
    from qmamba.testing import quantize_rtn, random_model

    torch.manual_seed(1)
    model = quantize_rtn(random_model(preset("tiny-blackmamba"), device), Int4Format(128))
    model.int8_activations = True
    prompt = torch.randint(0, model.config.vocab_size, (3, 6), device=device)
    _, state = model.prefill(prompt)
    policy = dataclasses.replace(DecodePolicy.for_device(torch.device(device)), formats=(0, 1, 3), max_rows=1,
                                 max_rows_planes=1, max_rows_routed=8, int4_planes=True, int4_unpack="denorm",
                                 planes_mma=False, routed_row_programs=True, int4_x_planes=True, int8_rows=True,
                                 int8_rows_fc2=fc2)
    model.set_backend("triton")

    def timed_step(policy):
        if device == "cuda":
            from qmamba.cuda_graph import GraphDecoder

            return GraphDecoder(model, policy=policy)
        return FusedDecodeStep(model, policy)

    step_fn = timed_step(policy)
    step = getattr(step_fn, "_step", step_fn)
    assert bench_lib.int8_rows_step(step_fn, 3) is step and bench_lib.int8_rows_step(step_fn, 1) is None
    real = bench_lib._reference_logits
    monkeypatch.setattr(bench_lib, "_reference_logits", lambda *a, **k: -real(*a, **k))  # the first check fails
    verdict = bench_lib.check_decode(model, step_fn, prompt, state, 3)
    assert verdict.startswith("ok (3 tokens x 3 rows, on the step's own int8 codes"), verdict
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert step.int8_inputs_log is None
    assert all(m.int8_step_fc1_inputs is None and m.int8_step_fc2_inputs is None for m in experts)
    assert all(m.backend == "triton" and not m.int8_step_fc1 and not m.int8_step_fc2 for m in experts)

    plain = timed_step(dataclasses.replace(policy, int8_rows=False))
    with pytest.raises(bench_lib.BenchCheckError, match=r"\(gap [^)]*\); no figure reported"):
        bench_lib.check_decode(model, plain, prompt, state, 3)
    monkeypatch.undo()  # the real reference from here
    wrong_fn = timed_step(policy)  # (a graph decoder records only where it captures inside the check)

    class Wrong:  # the same step whose picks are the reference's least likely tokens
        _step = getattr(wrong_fn, "_step", wrong_fn)

        def __call__(self, ids, st):
            return -wrong_fn(ids, st)

    with pytest.raises(bench_lib.BenchCheckError, match="own int8 codes; no figure reported"):
        bench_lib.check_decode(model, Wrong(), prompt, state, 3)
