"""End to end: qmamba quantize on a random tiny BlackMamba (CPU, seconds): the result loads and reloads
identically, the manifest records the run, a crash or Ctrl-C midway leaves no output, MoE fallbacks are defined,
and user mistakes are one-line errors (exit 2)."""

import json

import pytest
import torch
from click.testing import CliRunner

import qmamba.calib.gptq as gptq
from qmamba.calib.pipeline import CalibOptions
from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
from qmamba.checkpoints.load import load_model
from qmamba.cli import main
from qmamba.quant.modules import QuantExperts, QuantLinear

SMALL = dict(nsamples=4, seq_len=64)


def run(ckpt, out, calib_file, **kw):
    opts = kw.pop("options", CalibOptions(progress=False, batch_size=2))
    options = QuantizeOptions(calib=[str(calib_file)], calibration=opts, **{**SMALL, **kw})
    return quantize_checkpoint(ckpt, out, options, log=lambda *_: None)


@pytest.mark.parametrize("method,bits", [("gptq", 4), ("awq", 4), ("rtn", 8)])
def test_quantized_checkpoint_loads_and_reloads_identically(tiny_checkpoint, calib_text_file, tmp_path, method,
                                                            bits):
    out = tmp_path / "q"
    info = run(tiny_checkpoint, out, calib_text_file, method=method, bits=bits,
               group_size=32 if bits == 4 else None,
               quantize_head=(method in ("rtn", "awq")))
    a, b = load_model(out), load_model(out)
    fp = load_model(tiny_checkpoint)
    assert isinstance(a.layers[0].mixer.in_proj, QuantLinear)
    assert isinstance(a.layers[1].mixer.experts, QuantExperts)
    assert isinstance(a.lm_head, QuantLinear) == (method in ("rtn", "awq"))
    ids = torch.randint(0, a.config.vocab_size, (2, 12))
    la = a(ids)
    assert torch.equal(la, b(ids))
    # step-by-step decoding through the quantized modules reproduces the parallel forward
    state = a.new_state(2)
    for t in range(6):
        torch.testing.assert_close(a.step(ids[:, t], state), la[:, t], rtol=1e-4, atol=1e-4)
    rel = float((la - fp(ids)).norm() / fp(ids).norm())
    assert 0 < rel < (0.02 if bits == 8 else 0.2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["layers.1.mixer.experts.fc1"]["method"] == method
    qi = manifest["quantization_info"]
    assert len(qi["calibration"]["sha256"]) == 64 and qi["calibration"]["nsamples"] == 4
    assert qi["versions"]["torch"] == torch.__version__
    assert set(manifest["source"]["files"]) >= {"model.safetensors", "config.json"}
    assert 0.9 <= qi["router_agreement"]["overall"] <= 1.0
    assert info["summary"][0]["bytes_after"] < info["summary"][0]["bytes_before"]
    assert all(r["sqnr_db"] > (30 if bits == 8 else 10) for r in qi["summary"])
    assert (out / "tokenizer.json").is_file()


def test_awq_fold_exactness_direct(tiny_checkpoint):
    """Folding 1/s into RMSNorm (+ router columns) and s into the consumers leaves the float model unchanged."""
    model = load_model(tiny_checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ref = model(ids)
    torch.manual_seed(0)
    for block in model.blocks:
        s = torch.exp(torch.randn(model.config.d_model) * 0.5)
        block.norm.weight.data /= s
        if block.is_mamba:
            block.mixer.in_proj.weight.data *= s
        else:
            block.mixer.router.weight.data *= s
            block.mixer.experts.fc1.data *= s
            ffn = block.mixer.experts.fc2.shape[2]
            s2 = torch.exp(torch.randn(ffn) * 0.5)
            block.mixer.experts.fc1.data[:, ffn:] /= s2[:, None]
            block.mixer.experts.fc2.data *= s2
    torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exc", [RuntimeError("boom in layer"), KeyboardInterrupt()])
def test_crash_midway_leaves_no_output(tiny_checkpoint, calib_text_file, tmp_path, monkeypatch, exc):
    calls = {"n": 0}
    real = gptq.gptq_quantize

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize", failing)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        run(tiny_checkpoint, out, calib_text_file, method="gptq")
    assert calls["n"] == 3
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind either


def test_expert_fallbacks_are_defined(tiny_checkpoint, calib_text_file, tmp_path):
    """Route (almost) everything to expert 0: the others see zero tokens and use all-token statistics."""
    from qmamba.checkpoints.detect import read_checkpoint
    from qmamba.checkpoints.native import save_checkpoint

    cfg, sd, _ = read_checkpoint(tiny_checkpoint)
    for i in cfg.moe_layer_ids:
        sd[f"layers.{i}.mixer.router.bias"][0] = 1e4
    skewed = tmp_path / "skewed"
    save_checkpoint(sd, cfg, skewed, tokenizer_file=tiny_checkpoint / "tokenizer.json")
    for method in ("gptq", "awq"):
        out = tmp_path / f"q-{method}"
        info = run(skewed, out, calib_text_file, method=method, group_size=32)
        manifest = json.loads((out / "manifest.json").read_text())
        fb = manifest["quantization"]["layers.1.mixer.experts.fc1"]["fallback"]
        assert fb == {"1": "all-tokens", "2": "all-tokens", "3": "all-tokens"}
        rows = {r["kind"]: r for r in info["summary"]}
        assert len(rows["experts.fc1"]["fallbacks"]) == 6  # 3 experts x 2 MoE layers
        model = load_model(out)
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), name


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_quantize_and_errors(tiny_checkpoint, calib_text_file, tmp_path):
    out = tmp_path / "q8"
    r = cli("quantize", tiny_checkpoint, "-o", out, "--bits", "8", "--method", "rtn", "--calib", calib_text_file,
            "--nsamples", 2, "--seq-len", 32, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "SQNR" in r.output and "router top-1 agreement" in r.output and out.is_dir()
    r = cli("info", out)
    assert r.exit_code == 0 and "int8" in r.output
    # the result is not quantized again
    r = cli("quantize", out, "-o", tmp_path / "again", "--calib", calib_text_file, "--nsamples", 2,
            "--seq-len", 32)
    assert r.exit_code == 2 and "already quantized" in r.output

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("rules:\n  - {pattern: '*.in_proj', bitss: 4}\n")
    cases = [
        (["--bits", "3"], "'3' is not one of '1', '4', '8'"),
        (["--calib", empty], "empty"),
        (["--calib", calib_text_file, "--nsamples", 100000], "too short"),
        (["--calib", calib_text_file, "--recipe", bad_recipe], "unknown recipe keys"),
        (["--group-size", "48"], "--group-size"),
    ]
    for extra, message in cases:
        target = tmp_path / "never"
        r = cli("quantize", tiny_checkpoint, "-o", target, "--no-progress", *extra)
        assert r.exit_code == 2, (extra, r.output)
        assert message in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not target.exists()
    r = cli("quantize", tmp_path / "missing", "-o", tmp_path / "never")
    assert r.exit_code == 2 and not (tmp_path / "never").exists()
