"""Quantized checkpoints (int4 group-wise, int8 per-channel; RTN through qmamba.quant) exported to MatMulNBits,
against the PyTorch dequantized reference path; greedy generation on the trained fixture."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export_helpers import rel_err, rtn_quantized, tiny_state_dict, torch_model  # noqa: E402

from qmamba.export.exporter import export_model  # noqa: E402
from qmamba.export.graph import ExportOptions  # noqa: E402
from qmamba.export.ort_runner import OrtLM, generate_onnx  # noqa: E402
from qmamba.generation import generate  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "qmamba" / "assets" / "tiny-blackmamba"


def compare_steps(lm, model, cfg, seed=0, steps=8):
    """Max relative logits error over a prefill of 6 tokens and ``steps`` decode steps, batch 2."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    logits, state = lm.prefill(prompt)
    ref, ref_state = model.prefill(prompt)
    errors = [rel_err(logits, ref)]
    for _ in range(steps):
        token = torch.randint(0, cfg.vocab_size, (2,), generator=g)
        errors.append(rel_err(lm.step(token, state), model.step(token, ref_state)))
    return max(errors)


@pytest.fixture(scope="module", params=[("tiny-blackmamba", "int4"), ("tiny-blackmamba", "int8"),
                                        ("tiny-mamba", "int4"), ("tiny-mamba", "int8")],
                ids=lambda p: "-".join(p))
def quantized(request):
    name, kind = request.param
    cfg, sd = tiny_state_dict(name)
    qsd, manifest = rtn_quantized(cfg, sd, kind)  # group 32: dt_proj (K = 4) exercises the padded tail
    return cfg, qsd, manifest, torch_model(cfg, qsd, manifest)


def test_matmulnbits_exact_at_accuracy_level_0(tmp_path, quantized):
    """fp32 activations: only float rounding separates ORT from the dequantized reference."""
    cfg, qsd, manifest, model = quantized
    summary = export_model(cfg, qsd, manifest, tmp_path / "q.onnx", ExportOptions(accuracy_level=0))
    assert summary.ops["com.microsoft::MatMulNBits"] == summary.quantized_modules_weights
    assert compare_steps(OrtLM(tmp_path / "q.onnx"), model, cfg) <= 1e-4


def test_accuracy_level_4_within_activation_rounding(tmp_path, quantized):
    """int8 activations (the fast CPU path): a few percent on a plain Mamba; MoE routing may flip on random
    weights, so the BlackMamba check is only that the two paths agree on most argmax tokens."""
    cfg, qsd, manifest, model = quantized
    lm = OrtLM(export_model(cfg, qsd, manifest, tmp_path / "q.onnx", ExportOptions(accuracy_level=4)).path)
    if cfg.n_mamba_layers == cfg.n_layers:
        assert compare_steps(lm, model, cfg) < 0.1
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    logits, _ = lm.prefill(ids)
    agree = (logits.argmax(-1) == model(ids).argmax(-1)).float().mean().item()
    assert agree >= 0.6


def test_float_and_quantized_mixed_with_bias_free_head(tmp_path):
    """Only the experts quantized (head tied, x_proj/dt_proj float): the graph mixes MatMul and MatMulNBits."""
    cfg, sd = tiny_state_dict("tiny-blackmamba")
    qsd, manifest = rtn_quantized(cfg, sd, "int4", head=False, xdt=False)
    model = torch_model(cfg, qsd, manifest)
    summary = export_model(cfg, qsd, manifest, tmp_path / "q.onnx", ExportOptions(accuracy_level=0))
    assert "Gemm" in summary.ops  # tied head
    assert compare_steps(OrtLM(tmp_path / "q.onnx"), model, cfg) <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not (FIXTURE / "manifest.json").is_file(), reason="trained fixture not present yet")
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fixture_greedy_tokens_match_pytorch(tmp_path, kind):
    from qmamba.checkpoints.native import read_checkpoint
    from qmamba.tokenizer import find_tokenizer_file, load_tokenizer

    cfg, sd, manifest = read_checkpoint(FIXTURE, hash_files=False)
    if manifest.get("quantization"):
        pytest.skip("the fixture is already quantized")
    qsd, qmanifest = rtn_quantized(cfg, sd, kind, group_size=64)
    model = torch_model(cfg, qsd, qmanifest)
    out = export_model(cfg, qsd, qmanifest, tmp_path / "q.onnx", ExportOptions()).path
    tok = load_tokenizer(find_tokenizer_file(FIXTURE))
    prompt = torch.tensor([tok.encode("The king said that")], dtype=torch.int64)
    ours = generate_onnx(out, prompt, 32, temperature=0)
    theirs = generate(model, prompt, 32, temperature=0)
    assert torch.equal(ours, theirs), (tok.decode(ours[0].tolist()), tok.decode(theirs[0].tolist()))
