"""RTN and 1-bit PTB read no calibration data unless asked; the router-agreement report runs on request on a small
token budget; GPTQ still calibrates by default (on the text shipped with qmamba). The block-at-a-time walk (the
model kept in the checkpoint's bf16, one block in float32 at a time) gives the same quantized weights as the whole
model in float32, and its routing record equals the model's forward."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import qmamba.calib.pipeline as pipeline
import qmamba.calib.quantize as quantize_module
from qmamba.calib.data import load_calibration
from qmamba.calib.pipeline import CalibOptions, calibrate, record_routing_blockwise
from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
from qmamba.calib.recipe import build_plan
from qmamba.checkpoints.detect import read_checkpoint
from qmamba.checkpoints.load import build_model, load_model
from qmamba.eval import record_routing
from qmamba.quant.modules import swap_quantized_modules
from qmamba.tokenizer import load_tokenizer


def quantize_quietly(src, out, **fields):
    options = QuantizeOptions(calibration=CalibOptions(progress=False, batch_size=2), **fields)
    return quantize_checkpoint(src, out, options, log=lambda *_: None)


def forbid_data(monkeypatch):
    """Any read of calibration text, or any routing pass, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("calibration data was read")

    monkeypatch.setattr(quantize_module, "load_calibration", refuse)
    monkeypatch.setattr("qmamba.data_files.read_text", refuse)
    monkeypatch.setattr(quantize_module, "record_routing_blockwise", refuse)


@pytest.mark.parametrize("bits,options", [(4, dict(method="rtn", group_size=32)), (8, dict(method="rtn")),
                                          (1, {})])  # 1 bit: PTB, its only initialisation
def test_data_free_methods_read_no_calibration_data(tiny_checkpoint, tmp_path, monkeypatch, bits, options):
    forbid_data(monkeypatch)
    out = tmp_path / "q"
    info = quantize_quietly(tiny_checkpoint, out, bits=bits, **options)
    assert info["calibration"] is None and info["router_agreement"] is None and info["report_data"] is None
    assert (out / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    entries = json.loads((out / "manifest.json").read_text())["quantization"]
    assert {e["method"] for e in entries.values()} == {"ptb" if bits == 1 else "rtn"}
    model = load_model(out)
    assert torch.isfinite(model(torch.randint(0, model.config.vocab_size, (1, 8)))).all()


def test_data_free_rtn_equals_rounding_each_weight_and_the_calibrated_walk(tiny_checkpoint, calib_text_file,
                                                                           tmp_path):
    """Independent reference: the format's own RTN of every source weight; and the walk with data (GPTQ-style
    sequential inputs) must not change an RTN result either."""
    from qmamba.quant.formats import make_format

    quantize_quietly(tiny_checkpoint, tmp_path / "free", method="rtn", group_size=32, quantize_head=True)
    quantize_quietly(tiny_checkpoint, tmp_path / "walk", method="rtn", group_size=32, quantize_head=True,
                     calib=[str(calib_text_file)], nsamples=4, seq_len=32)
    free = load_file(tmp_path / "free" / "model.safetensors")
    walk = load_file(tmp_path / "walk" / "model.safetensors")
    assert free.keys() == walk.keys()
    for name in free:
        assert torch.equal(free[name], walk[name]), name
    _, source, _ = read_checkpoint(tiny_checkpoint)
    fmt = make_format(4, 32, False)
    checked = 0
    for name, W in source.items():
        stem = name.removesuffix(".weight")
        if f"{stem}.qweight" in free:
            expected = fmt.quantize_rtn(W.float()) if W.dim() == 2 else None
            if expected is None:  # stacked experts: per expert
                parts = [fmt.quantize_rtn(W[e].float()) for e in range(W.shape[0])]
                expected = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
            for key, value in expected.items():
                assert torch.equal(free[f"{stem}.{key}"], value), (name, key)
            checked += 1
    lm_head_tied = "lm_head.qweight" in free and "lm_head.weight" not in source
    assert checked == 8 and lm_head_tied  # in/out_proj x2, fc1/fc2 x2; the head checked below
    expected = fmt.quantize_rtn(source["embedding.weight"].float())
    assert all(torch.equal(free[f"lm_head.{k}"], v) for k, v in expected.items())


def test_report_on_request_uses_a_small_token_budget(tiny_checkpoint, tmp_path):
    info = quantize_quietly(tiny_checkpoint, tmp_path / "q", method="rtn", group_size=32, report=True,
                            report_tokens=100, seq_len=32)
    assert info["calibration"] is None  # the quantization itself used no data
    assert info["report_data"]["nsamples"] == math.ceil(100 / 32) and info["report_data"]["seq_len"] == 32
    assert info["report_data"]["source"].startswith("corpus:train")  # the text shipped with qmamba
    router = info["router_agreement"]
    assert router["tokens"] == 4 * 32 and 0.5 <= router["overall"] <= 1.0
    assert set(map(int, router["per_layer"])) == {1, 3}


def test_gptq_calibrates_on_the_shipped_text_by_default(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QMAMBA_DATA_DIR", str(tmp_path / "nowhere"))  # no full corpus needed
    info = quantize_quietly(tiny_checkpoint, tmp_path / "q", method="gptq", group_size=32, nsamples=4, seq_len=32,
                            report_tokens=64)
    assert info["calibration"]["source"] == "corpus:train seed=0" and info["calibration"]["nsamples"] == 4
    assert info["router_agreement"]["tokens"] == 64  # report on by default with data, on the budget


# ---- one block at a time ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_source(tiny_checkpoint, tiny_tokenizer, calib_text_file):
    """The tiny checkpoint's weights in bf16 (as published BlackMamba), its config and calibration ids."""
    cfg, sd, _ = read_checkpoint(tiny_checkpoint)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    ids = load_calibration([str(calib_text_file)], load_tokenizer(tiny_tokenizer), 6, 32).ids
    return cfg, sd, ids


def model_from(cfg, sd, dtype=None):
    """The one builder on a copy of ``sd`` (``dtype=None``: the stored dtypes kept); a tied head stays tied."""
    model = build_model(cfg, {k: v.clone() for k, v in sd.items()}, {}, "cpu", dtype)
    assert model.lm_head.weight is model.embedding.weight
    return model


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_blockwise_walk_matches_the_float32_model(bf16_source, method, monkeypatch):
    cfg, sd, ids = bf16_source
    opts = CalibOptions(progress=False, batch_size=2)
    whole = model_from(cfg, sd, torch.float32)  # as before: the whole model converted to float32 first
    plan = build_plan(whole, 4, 32, method=method, quantize_head=True)
    reference = calibrate(whole, ids, plan, opts)

    kept = model_from(cfg, sd)  # kept in bf16; each block goes to float32 for its turn only
    seen = []
    real_mamba, real_moe = pipeline.Calibrator._mamba_block, pipeline.Calibrator._moe_block

    def spy(real):
        def wrapped(self, block, residual):
            seen.append((block.index, [b.norm.weight.dtype for b in self.model.layers]))
            return real(self, block, residual)
        return wrapped

    monkeypatch.setattr(pipeline.Calibrator, "_mamba_block", spy(real_mamba))
    monkeypatch.setattr(pipeline.Calibrator, "_moe_block", spy(real_moe))
    results = calibrate(kept, ids, plan, opts, device="cpu")
    for i, dtypes in seen:  # only the current block is in float32
        assert dtypes == [torch.float32 if j == i else torch.bfloat16 for j in range(cfg.n_layers)]
    assert [i for i, _ in seen] == list(range(cfg.n_layers))
    assert results.keys() == reference.keys()
    for name in results:
        for key, value in reference[name].packed.items():
            assert torch.equal(results[name].packed[key], value), (name, key)
    # after the walk every tensor is back in bf16 (AWQ folds rounded to bf16, as the saved output is anyway)
    assert {p.dtype for n, p in kept.named_parameters()} == {torch.bfloat16}
    for name, p in kept.named_parameters():
        if "norm" in name or "router" in name:
            assert torch.equal(p, whole.get_parameter(name).to(torch.bfloat16)), name


def test_blockwise_routing_record_equals_the_forward(bf16_source):
    cfg, sd, ids = bf16_source
    model = model_from(cfg, sd, torch.float32)
    expected = record_routing(model, ids, batch_size=4)
    got = record_routing_blockwise(model, ids, "cpu", batch_size=4)
    assert got.keys() == expected.keys() == set(cfg.moe_layer_ids)
    for i in got:
        assert torch.equal(got[i], expected[i]), i
    # and on a quantized model (packed buffers move with their blocks, keep their dtypes)
    plan = build_plan(model, 4, 32, method="rtn")
    results = calibrate(model, None, plan, CalibOptions(progress=False))
    swap_quantized_modules(model, {n: r.fmt for n, r in results.items()}, {n: r.packed for n, r in results.items()})
    expected = record_routing(model, ids, batch_size=4)
    got = record_routing_blockwise(model, ids, "cpu", batch_size=4)
    assert all(torch.equal(got[i], expected[i]) for i in got)


def test_float32_hessian_accumulation_is_close_to_float64():
    from qmamba.calib.gptq import HessianAccumulator

    x = torch.randn(4, 300, 48)
    a, b = HessianAccumulator(48, dtype=torch.float64), HessianAccumulator(48, dtype=torch.float32)
    for chunk in x:
        a.add(chunk)
        b.add(chunk)
    reference = 2 * (x.reshape(-1, 48).double().T @ x.reshape(-1, 48).double()) / 1200
    torch.testing.assert_close(a.hessian().double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.hessian().double(), reference, rtol=1e-4, atol=1e-4)
    assert pipeline.hessian_dtype(CalibOptions(), "cuda") == torch.float32
    assert pipeline.hessian_dtype(CalibOptions(), "cpu") == torch.float64
