"""The int8-activation check behind the W4A8 prefill's default (qmamba/calib/int8_check.py): its KL equals the one
of two whole forwards, it passes a trained model and fails one with an outlier channel, ``qmamba quantize`` records
it and ``load_model`` follows it (or the caller), the model's prefill then runs under the W4A8 policy, and the
reference path is the kernels' twin from the kernels' row threshold."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import qmamba
from qmamba.calib.chunked_kl import kl_sum
from qmamba.calib.int8_check import KL_LIMIT, int8_activation_check, w4a8_experts
from qmamba.calib.pipeline import CalibOptions
from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
from qmamba.checkpoints.load import checkpoint_int8_activations, load_model
from qmamba.kernels.matmul_configs import W4A8_PREFILL_MIN_M, current_policy
from qmamba.quant.formats import Int4Format
from qmamba.quant.modules import QuantExperts
from qmamba.testing import quantize_rtn

FIXTURE = Path(qmamba.__file__).parent / "assets" / "tiny-blackmamba"  # trained; d_model 128: int4 g128 planes


def _quantized(group=128):
    return quantize_rtn(load_model(FIXTURE), Int4Format(group))


def _ids(model, n=4, length=64, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def _set_int8(model, on):
    for m in model.modules():
        if isinstance(m, QuantExperts):
            m.int8_inputs = on


@torch.no_grad()
def test_check_equals_whole_forwards_and_passes_a_trained_model():
    model = _quantized()
    ids = _ids(model)
    got = int8_activation_check(model, ids, batch_size=3)
    plain = model(ids)
    _set_int8(model, True)
    rounded = model(ids)
    _set_int8(model, False)
    want = float(kl_sum(rounded, plain)) / ids.numel()
    assert got["tokens"] == ids.numel()
    assert got["kl"] == pytest.approx(want, rel=1e-3, abs=1e-9)
    assert got["top1_agreement"] == pytest.approx(float((plain.argmax(-1) == rounded.argmax(-1)).float().mean()))
    assert 0 < got["kl"] < KL_LIMIT and got["prefill_default"] is True
    assert not any(m.int8_inputs for m in model.modules() if isinstance(m, QuantExperts))
    assert torch.equal(model(ids), plain)  # the model is left as it was
    # chunks of fewer rows than the kernels round from (1 x 16) are merged until they have them (4 x 16): the same
    # figure as asked for in chunks of 4 (without the merge the rounding would not apply: KL 0)
    short = _ids(model, 8, 16)
    merged = int8_activation_check(model, short, batch_size=1)
    assert merged["kl"] > 0 and merged["kl"] == int8_activation_check(model, short, batch_size=4)["kl"]


@torch.no_grad()
def test_check_fails_a_model_with_an_outlier_channel():
    """One channel of each MoE block's input 300x larger (its norm weight scaled): per-row int8 rounding then
    zeroes most of the other channels of every row, and the check turns the W4A8 prefill off."""
    model = _quantized()
    for block in model.blocks:
        if not block.is_mamba:
            block.norm.weight.data[3] *= 300
    got = int8_activation_check(model, _ids(model))
    assert got["kl"] > KL_LIMIT and got["prefill_default"] is False


def test_nothing_to_check_without_w4a8_experts():
    model = _quantized(group=32)  # int4 g32: no plane words, the kernels never take W4A8
    assert w4a8_experts(model) == [] and int8_activation_check(model, _ids(model)) is None


def test_reference_rounds_from_the_kernels_row_threshold():
    """With ``int8_inputs`` the reference MoE rounds its int4 experts' inputs from W4A8_PREFILL_MIN_M rows (the
    kernels' threshold: a prefill, never a decode step), as int8_rounded_ref does."""
    from qmamba.kernels.w4a8_gemm import int8_rounded_ref

    experts = next(m for m in _quantized().modules() if isinstance(m, QuantExperts))
    for rows in (W4A8_PREFILL_MIN_M - 1, W4A8_PREFILL_MIN_M):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        idx = torch.arange(rows) % experts.n_experts
        plain = experts(x, idx)
        experts.int8_inputs = True
        got = experts(x, idx)
        experts.int8_inputs = False
        if rows < W4A8_PREFILL_MIN_M:
            assert torch.equal(got, plain)
        else:
            assert not torch.equal(got, plain)
            e0 = idx == 0
            h = experts._expert_matmul(int8_rounded_ref(x[e0]), "fc1", 0)
            from qmamba.moe import activation_fn

            act = activation_fn(experts.activation)
            f = h.shape[1] // 2
            want = experts._expert_matmul(int8_rounded_ref(act(h[:, :f]) * h[:, f:]), "fc2", 0)
            torch.testing.assert_close(got[e0], want)


def test_prefill_runs_under_the_w4a8_policy_when_the_model_says_so():
    model = _quantized()
    seen = []
    moe = next(b for b in model.blocks if not b.is_mamba)
    moe.mixer.register_forward_pre_hook(lambda *_: seen.append(current_policy().w4a8_min_m))
    ids = _ids(model, 1, 8)
    model.prefill(ids)
    model.int8_activations = True
    model.prefill(ids)
    assert seen == [0, W4A8_PREFILL_MIN_M] and current_policy().w4a8_min_m == 0


def test_manifest_decides_and_the_caller_overrides(tmp_path):
    assert checkpoint_int8_activations({"quantization_info": {"int8_activations": {"prefill_default": True}}})
    for manifest in ({}, {"quantization_info": None}, {"quantization_info": {"int8_activations": None}},
                     {"quantization_info": {"int8_activations": {"prefill_default": "yes"}}}):
        assert not checkpoint_int8_activations(manifest)
    ckpt = tmp_path / "m"
    shutil.copytree(FIXTURE, ckpt)
    assert load_model(ckpt).int8_activations is False
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest.setdefault("quantization_info", {})["int8_activations"] = {"prefill_default": True}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert load_model(ckpt).int8_activations is True
    assert load_model(ckpt, int8_activations=False).int8_activations is False


def test_quantize_records_the_check(tmp_path, calib_text_file):
    """The default method (GPTQ, int4 g128) on the trained fixture: the manifest records the check on the report
    tokens, the loaded model follows it, and ``qmamba info`` shows it."""
    from click.testing import CliRunner

    from qmamba.cli import main

    out = tmp_path / "q"
    options = QuantizeOptions(calib=[str(calib_text_file)], nsamples=4, seq_len=64, report_tokens=256,
                              calibration=CalibOptions(progress=False, batch_size=2))
    lines = []
    info = quantize_checkpoint(FIXTURE, out, options, log=lines.append)
    check = info["int8_activations"]
    assert check["tokens"] == 256 and check["prefill_default"] == (check["kl"] <= KL_LIMIT)
    assert json.loads((out / "manifest.json").read_text())["quantization_info"]["int8_activations"] == check
    assert load_model(out).int8_activations is check["prefill_default"]
    assert any(line.startswith("int8 activations") for line in lines)
    shown = CliRunner().invoke(main, ["info", str(out)]).output
    assert "int8 prefill:" in shown


def test_results_say_whether_the_prefill_ran_on_int8():
    """Off CUDA the flag changes nothing, and results say so (``int8_prefill``); eval prints a line when it ran."""
    from qmamba.cli.eval_cmd import _format_result

    model = _quantized()
    model.int8_activations = True
    assert model.int8_prefill is False  # CPU, reference backend
    assert "int8 activations" in _format_result({"path": "m", "int8_activations": True})
    assert "int8" not in _format_result({"path": "m", "int8_activations": False})
