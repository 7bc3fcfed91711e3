"""Quantized checkpoints (int4 group-wise, int8 per-channel; RTN through qmamba.quant) exported to MatMulNBits,
against the PyTorch dequantized reference path; greedy generation on the trained fixture."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export_helpers import dequantized_twin, rel_err, rtn_quantized, tiny_state_dict, torch_model  # noqa: E402

from qmamba.export.exporter import export_model  # noqa: E402
from qmamba.export.graph import ExportOptions  # noqa: E402
from qmamba.export.ort_runner import OrtLM, generate_onnx  # noqa: E402
from qmamba.generation import generate  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[3] / "qmamba" / "assets" / "tiny-blackmamba"


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


PROMPTS = ["The king said that", "Once upon a time"]


@pytest.fixture(scope="module")
def fixture_model():
    """``(config, state_dict, tokenizer, cache)``; ``cache`` keeps each variant's checkpoint and reference tokens."""
    from qmamba.checkpoints.detect import read_checkpoint
    from qmamba.tokenizer import resolve_tokenizer

    if not (FIXTURE / "manifest.json").is_file():
        pytest.skip("trained fixture not present")
    cfg, sd, manifest = read_checkpoint(FIXTURE, hash_files=False)
    if manifest.get("quantization"):
        pytest.skip("the fixture is already quantized")
    return cfg, sd, resolve_tokenizer(FIXTURE), {}


def greedy_pair(tmp_path, fixture_model, kind, accuracy_level):
    """``[(onnx tokens, pytorch tokens)]`` of 32 greedy tokens per prompt (new tokens only)."""
    cfg, sd, tok, cache = fixture_model
    prompts = [torch.tensor([tok.encode(text)], dtype=torch.int64) for text in PROMPTS]
    if kind not in cache:
        qsd, manifest = (sd, {}) if kind == "fp32" else rtn_quantized(cfg, sd, kind, group_size=64)
        model = dequantized_twin(torch_model(cfg, qsd, manifest))  # same math, faster than dequantizing per call
        reference = [generate(model, p, 32, temperature=0)[0, p.shape[1]:] for p in prompts]
        cache[kind] = (qsd, manifest, reference)
    qsd, manifest, reference = cache[kind]
    out = export_model(cfg, qsd, manifest, tmp_path / "q.onnx", ExportOptions(accuracy_level=accuracy_level)).path
    ours = [generate_onnx(out, p, 32, temperature=0)[0, p.shape[1]:] for p in prompts]
    return list(zip(ours, reference))


@pytest.mark.slow
@pytest.mark.parametrize("kind, accuracy_level", [("fp32", 4), ("int4", 0), ("int8", 0), ("int8", 4)])
def test_fixture_greedy_tokens_match_pytorch(tmp_path, fixture_model, kind, accuracy_level):
    """32 greedy tokens identical to the PyTorch (dequantized) reference. int4 at accuracy_level 4 is checked
    separately: its int8 activations may flip a near-tie late in a continuation."""
    for ours, theirs in greedy_pair(tmp_path, fixture_model, kind, accuracy_level):
        assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_fixture_int4_fast_path_agrees_for_most_tokens(tmp_path, fixture_model):
    """int4 with int8 activations (the default export): a long common prefix with the reference (measured: 22
    and 32 of 32 tokens for the two prompts), not bit-identical continuations."""
    prefixes = []
    for ours, theirs in greedy_pair(tmp_path, fixture_model, "int4", 4):
        differ = (ours != theirs).nonzero()
        prefixes.append(32 if len(differ) == 0 else int(differ[0]))
    assert min(prefixes) >= 12 and sum(prefixes) >= 40, prefixes
