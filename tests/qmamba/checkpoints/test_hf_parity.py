"""Logits of checkpoints written by HF transformers (and the same weights in mamba_ssm format) equal the
transformers ``MambaForCausalLM`` slow path (fp32)."""

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from qmamba.checkpoints.detect import detect_format  # noqa: E402
from qmamba.checkpoints.load import load_model  # noqa: E402

VOCAB, PAD_MULTIPLE = 50, 8  # mamba_ssm pads 50 -> 56 rows
VARIANTS = {
    "tied": dict(tie_word_embeddings=True, use_bias=False, use_conv_bias=True),
    "untied-bias": dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_hf_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=56, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2,
                                   conv_kernel=4, time_step_rank="auto", layer_norm_epsilon=1e-5,
                                   use_mambapy=False, **VARIANTS[variant])
    model = transformers.MambaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # every tensor non-trivial (norm weights, biases, D ...), so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.rand_like(p))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_safetensors_matches_transformers(tmp_path, ids, variant):
    model = make_hf_model(variant)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert detect_format(tmp_path / "hf") == "hf"
    ours = load_model(tmp_path / "hf")
    assert ours.config.tie_embeddings == VARIANTS[variant]["tie_word_embeddings"]
    assert rel_err(ours(ids), hf_logits(model, ids)) <= 1e-4


def test_hf_sharded_safetensors_loads(tmp_path, ids):
    model = make_hf_model("tied", seed=3)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert rel_err(load_model(tmp_path / "hf")(ids), hf_logits(model, ids)) <= 1e-4


def write_mamba_ssm(model, out_dir, tied: bool):
    """The HF model's weights in the state-spaces mamba_ssm layout, written independently of qmamba."""
    out_dir.mkdir()
    sd = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("backbone.embeddings.", "backbone.embedding.")
        sd[name] = tensor.clone()
    if tied:  # mamba_ssm's state_dict() lists the tied head too, sharing the embedding's storage
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, out_dir / "pytorch_model.bin")
    hf = model.config
    ssm_cfg = {"d_state": hf.state_size, "d_conv": hf.conv_kernel, "expand": hf.expand}
    if not hf.use_conv_bias:
        ssm_cfg["conv_bias"] = False
    if hf.use_bias:
        ssm_cfg["bias"] = True
    config = {"d_model": hf.hidden_size, "n_layer": hf.num_hidden_layers, "vocab_size": VOCAB, "ssm_cfg": ssm_cfg,
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": PAD_MULTIPLE, "tie_embeddings": tied}
    (out_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mamba_ssm_format_matches_transformers(tmp_path, ids, variant):
    model = make_hf_model(variant, seed=5)
    tied = VARIANTS[variant]["tie_word_embeddings"]
    write_mamba_ssm(model, tmp_path / "ssm", tied)
    assert detect_format(tmp_path / "ssm") == "mamba_ssm"
    ours = load_model(tmp_path / "ssm")
    assert ours.config.vocab_size == 56 and ours.config.extra["source_vocab_size"] == VOCAB
    assert rel_err(ours(ids), hf_logits(model, ids)) <= 1e-4


def test_qmamba_hf_writer_is_readable_by_transformers(tmp_path, ids):
    """qmamba's HF writer (used by ``qmamba create --format hf``) produces what transformers loads."""
    from qmamba.checkpoints.random_init import create_checkpoint

    create_checkpoint("tiny-mamba", "hf", tmp_path / "hf", seed=2, dtype="float32")
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    ours = load_model(tmp_path / "hf")
    assert rel_err(ours(ids), hf_logits(theirs, ids)) <= 1e-4
