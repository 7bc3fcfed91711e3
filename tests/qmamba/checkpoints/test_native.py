"""Native qmamba checkpoints: exact round trip, tied head not stored, shared tensors, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open

from qmamba.checkpoints import native
from qmamba.checkpoints.load import build_model, load_model
from qmamba.checkpoints.detect import read_checkpoint
from qmamba.checkpoints.native import save_checkpoint
from qmamba.checkpoints.random_init import random_state_dict
from qmamba.config import preset
from qmamba.errors import CheckpointError, ConfigError


def make_model(name="tiny-blackmamba", seed=0):
    cfg = preset(name)
    return cfg, build_model(cfg, random_state_dict(cfg, seed), {}, "cpu", torch.float32)


@pytest.mark.parametrize("name", ["tiny-blackmamba", "tiny-mamba"])
def test_round_trip_is_exact(tmp_path, name):
    cfg, model = make_model(name)
    source = {"format": "blackmamba", "path": "/somewhere", "files": {"pytorch_model.bin": "ab" * 32}}
    out = save_checkpoint(model, cfg, tmp_path / "ck", source=source, extra={"note": "test"})
    cfg2, sd, manifest = read_checkpoint(out)
    assert cfg2 == cfg
    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(original)
    for k, v in original.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert manifest["format"] == "qmamba" and manifest["format_version"] == 1
    assert manifest["dtype"] == "float32" and manifest["source"] == source and manifest["quantization"] is None
    assert manifest["note"] == "test" and "qmamba_version" in manifest
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    assert torch.equal(load_model(out)(ids), model(ids))


def test_tied_head_not_stored(tmp_path):
    cfg, model = make_model()
    save_checkpoint(model, cfg, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "embedding.weight" in keys
    loaded = load_model(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_dtype_cast_on_save(tmp_path):
    cfg, model = make_model()
    save_checkpoint(model, cfg, tmp_path / "ck", dtype="bfloat16")
    _, sd, manifest = read_checkpoint(tmp_path / "ck")
    assert manifest["dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in sd.values())


def test_shared_and_non_contiguous_tensors(tmp_path):
    cfg = preset("tiny-mamba")
    sd = random_state_dict(cfg, 0)
    sd["layers.1.norm.weight"] = sd["layers.0.norm.weight"]  # same tensor under two names
    sd["layers.0.mixer.out_proj.weight"] = sd["layers.0.mixer.out_proj.weight"].t().contiguous().t()  # transposed view
    both = torch.randn(2, cfg.d_inner)
    sd["layers.0.mixer.D"], sd["layers.1.mixer.D"] = both[0], both[1]  # two halves of one storage
    save_checkpoint(sd, cfg, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["aliases"] == {"layers.1.norm.weight": "layers.0.norm.weight"}
    _, back, _ = read_checkpoint(tmp_path / "ck")
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_refuses_non_empty_output_dir(tmp_path):
    cfg, model = make_model()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(model, cfg, tmp_path / "ck")
    assert (tmp_path / "ck" / "keep.txt").read_text() == "mine"
    save_checkpoint(model, cfg, tmp_path / "ck", overwrite=True)
    assert not (tmp_path / "ck" / "keep.txt").exists() and (tmp_path / "ck" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, exc):
    cfg, model = make_model()
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise exc("interrupted")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(exc):
        save_checkpoint(model, cfg, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_rejects_reserved_extra_and_bad_state_dict(tmp_path):
    cfg, model = make_model()
    with pytest.raises(ConfigError, match="reserved"):
        save_checkpoint(model, cfg, tmp_path / "a", extra={"format": "x"})
    sd = dict(model.state_dict())
    sd["layers.0.mixer.D"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mixer\.D.*shape"):
        save_checkpoint(sd, cfg, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_newer_format_version_rejected(tmp_path):
    cfg, model = make_model()
    save_checkpoint(model, cfg, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    manifest["format_version"] = native.FORMAT_VERSION + 1
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version"):
        read_checkpoint(tmp_path / "ck")


def test_tokenizer_is_copied_and_found(tmp_path):
    cfg, model = make_model()
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    save_checkpoint(model, cfg, tmp_path / "ck", tokenizer_file=tok)
    assert load_model(tmp_path / "ck").tokenizer_path == tmp_path / "ck" / "tokenizer.json"
    save_checkpoint(model, cfg, tmp_path / "ck2")
    assert load_model(tmp_path / "ck2").tokenizer_path is None


def test_quantized_checkpoint_round_trip(tmp_path):
    from qmamba.quant import modules
    from qmamba.quant.formats import format_from_dict

    cfg, model = make_model()
    entry = {"format": "int4", "group_size": 32, "symmetric": False}
    fmt = format_from_dict(entry)
    model.layers[0].mixer.in_proj = modules.QuantLinear.from_linear(model.layers[0].mixer.in_proj, fmt)
    model.layers[1].mixer.experts = modules.QuantExperts.from_stacked(model.layers[1].mixer.experts, fmt, None)
    quantization = {"layers.0.mixer.in_proj": entry, "layers.1.mixer.experts.fc1": entry}
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    expected = model(ids)
    save_checkpoint(model, cfg, tmp_path / "q", quantization=quantization)
    loaded = load_model(tmp_path / "q")
    assert loaded.checkpoint_manifest["quantization"] == quantization
    assert isinstance(loaded.layers[0].mixer.in_proj, modules.QuantLinear)
    assert loaded.layers[0].mixer.in_proj.qweight.dtype == torch.uint8
    assert torch.equal(loaded(ids), expected)
