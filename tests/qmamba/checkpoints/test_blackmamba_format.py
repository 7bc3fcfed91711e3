"""A tiny random model in the exact BlackMamba checkpoint format (bf16 ``{"model": ...}`` pickle, Megatron config
keys) loads and runs; its Mamba layers match transformers' ``MambaMixer`` and its MoE blocks match a
straightforward per-token implementation written here."""

import json
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer  # noqa: E402

from qmamba.checkpoints.detect import detect_format, read_checkpoint  # noqa: E402
from qmamba.checkpoints.load import load_model  # noqa: E402
from qmamba.errors import CheckpointError, ConfigError  # noqa: E402

D, N, W, EXPAND, FFN, VOCAB, E = 48, 8, 4, 2, 40, 96, 4
DI, R = EXPAND * D, math.ceil(D / 16)
PLAN = ["r", "4", "r", "4", "r"]


def blackmamba_tensors(seed=0, plan=PLAN, gated=True):
    """Source-named bf16 tensors, in the published file's order."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    sd = OrderedDict()
    sd["embedding.word_embeddings.weight"] = rnd(VOCAB, D, std=1.0)
    for i, code in enumerate(plan):
        p = f"decoder.layers.{i}."
        sd[p + "norm.weight"] = (1 + rnd(D)).to(torch.bfloat16)
        if code == "r":
            sd[p + "mixer.in_proj.weight"] = rnd(2 * DI, D)
            sd[p + "mixer.conv1d.weight"] = rnd(DI, 1, W, std=0.4)
            sd[p + "mixer.conv1d.bias"] = rnd(DI)
            sd[p + "mixer.x_proj.weight"] = rnd(R + 2 * N, DI)
            sd[p + "mixer.dt_proj.weight"] = rnd(DI, R, std=0.5)
            sd[p + "mixer.dt_proj.bias"] = rnd(DI, std=1.0) - 2
            sd[p + "mixer.A_log"] = torch.log(torch.arange(1, N + 1.0)).repeat(DI, 1).to(torch.bfloat16) + rnd(DI, N)
            sd[p + "mixer.D"] = 1 + rnd(DI)
            sd[p + "mixer.out_proj.weight"] = rnd(D, DI)
        else:
            sd[p + "mixer.router.weight"] = rnd(E, D, std=1.0)
            sd[p + "mixer.router.bias"] = rnd(E, std=1.0)
            for e in range(E):
                sd[p + f"mixer.local_experts.{e}.linear_fc1.weight"] = rnd(2 * FFN if gated else FFN, D)
                sd[p + f"mixer.local_experts.{e}.linear_fc2.weight"] = rnd(D, FFN)
    sd["decoder.final_layernorm.weight"] = (1 + rnd(D)).to(torch.bfloat16)
    sd["decoder.final_layernorm.bias"] = rnd(D)
    return sd


def blackmamba_config(plan=PLAN, **overrides):
    cfg = {"num_layers": len(plan), "hidden_size": D, "state_size": N, "conv_dimension": W, "vocab_size": VOCAB,
           "expansion_factor": EXPAND, "mamba_moe_layers": list(plan), "ffn_hidden_size": FFN,
           "add_bias_linear": False, "swiglu": True, "max_sequence_length": 2048,
           # keys the reference loader ignores, present in Megatron configs
           "num_attention_heads": 1, "layernorm_epsilon": 1e-5}
    cfg.update(overrides)
    return cfg


def write_blackmamba(path, sd=None, config=None):
    path.mkdir()
    torch.save({"model": sd if sd is not None else blackmamba_tensors()}, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(config if config is not None else blackmamba_config()))
    return path


# ---- independent oracle ------------------------------------------------------------------------------
def hf_mixer(sd, i):
    cfg = transformers.MambaConfig(hidden_size=D, state_size=N, expand=EXPAND, conv_kernel=W, time_step_rank=R,
                                   use_bias=False, use_conv_bias=True, use_mambapy=False)
    mixer = HFMambaMixer(cfg, layer_idx=i).float().eval()
    p = f"decoder.layers.{i}.mixer."
    mixer.load_state_dict({k: sd[p + k].float() for k in (
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "A_log", "D", "out_proj.weight")})
    return mixer


def moe_oracle(sd, i, x):
    """Token by token: sigmoid router with bias, top-1, output scaled by the winning probability, GELU-gated."""
    p = f"decoder.layers.{i}.mixer."
    out = torch.zeros_like(x)
    flat_in, flat_out = x.reshape(-1, D), out.view(-1, D)
    for t in range(flat_in.shape[0]):
        h = flat_in[t]
        probs = torch.sigmoid(sd[p + "router.weight"].float() @ h + sd[p + "router.bias"].float())
        e = int(torch.argmax(probs))
        a = sd[p + f"local_experts.{e}.linear_fc1.weight"].float() @ h
        gate, up = a[:FFN], a[FFN:]
        flat_out[t] = probs[e] * (sd[p + f"local_experts.{e}.linear_fc2.weight"].float() @ (F.gelu(gate) * up))
    return out


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def oracle_logits(sd, ids, plan=PLAN):
    emb = sd["embedding.word_embeddings.weight"].float()
    h, residual = emb[ids], None
    with torch.no_grad():
        for i, code in enumerate(plan):
            residual = h if residual is None else residual + h
            x = rms(residual, sd[f"decoder.layers.{i}.norm.weight"])
            h = hf_mixer(sd, i)(x) if code == "r" else moe_oracle(sd, i, x)
        residual = residual + h
        out = F.layer_norm(residual, (D,), sd["decoder.final_layernorm.weight"].float(),
                           sd["decoder.final_layernorm.bias"].float(), 1e-5)
    return out @ emb.T


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


# ---- tests -------------------------------------------------------------------------------------------
def test_blackmamba_checkpoint_loads_and_matches_oracle(tmp_path, ids):
    path = write_blackmamba(tmp_path / "bm")
    assert detect_format(path) == "blackmamba"
    model = load_model(path)
    assert model.config.layers == PLAN and model.config.final_norm == "layernorm"
    logits = model(ids)
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert rel_err(logits, oracle_logits(blackmamba_tensors(), ids)) <= 1e-4


def test_mamba_layers_match_hf_mixer(tmp_path):
    sd = blackmamba_tensors()
    model = load_model(write_blackmamba(tmp_path / "bm"))
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(0))
    for i in (0, 2, 4):
        with torch.no_grad():
            ours, _, _ = model.layers[i].mixer(x)
            theirs = hf_mixer(sd, i)(x)
        assert rel_err(ours, theirs) <= 1e-5


def test_moe_blocks_match_straightforward_implementation(tmp_path):
    sd = blackmamba_tensors()
    model = load_model(write_blackmamba(tmp_path / "bm"))
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(1))
    for i in (1, 3):
        with torch.no_grad():
            assert rel_err(model.layers[i].mixer(x), moe_oracle(sd, i, x)) <= 1e-5
    # routing really spreads tokens over several experts (else the test would check little)
    router = model.layers[1].mixer.router
    assert len(set(torch.sigmoid(router(x.reshape(-1, D))).argmax(-1).tolist())) >= 3


def test_bf16_dtype_kept_when_asked(tmp_path, ids):
    model = load_model(write_blackmamba(tmp_path / "bm"), dtype="bfloat16")
    assert model.embedding.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.embedding.weight  # tied
    assert torch.isfinite(model(ids).float()).all()


@pytest.mark.parametrize("plan_value", ["r4r4r", "r 4 r 4 r", "r,4,r,4,r"])
def test_layer_plan_as_string(tmp_path, ids, plan_value):
    path = write_blackmamba(tmp_path / "bm", config=blackmamba_config(mamba_moe_layers=plan_value))
    assert load_model(path).config.layers == PLAN


def test_non_gated_experts(tmp_path, ids):
    sd = blackmamba_tensors(gated=False)
    path = write_blackmamba(tmp_path / "bm", sd=sd, config=blackmamba_config(swiglu=False))
    model = load_model(path)
    assert not model.config.expert_gated
    x = torch.randn(5, D)
    e = model.layers[1].mixer.experts
    expected = sd["decoder.layers.1.mixer.local_experts.2.linear_fc2.weight"].float() @ F.gelu(
        sd["decoder.layers.1.mixer.local_experts.2.linear_fc1.weight"].float() @ x.T)
    assert rel_err(e(x, torch.full((5,), 2)), expected.T) <= 1e-5


def test_gated_weights_with_swiglu_false_is_a_clear_error(tmp_path):
    path = write_blackmamba(tmp_path / "bm", config=blackmamba_config(swiglu=False))
    with pytest.raises(CheckpointError, match=r"linear_fc1\.weight.*swiglu"):
        read_checkpoint(path)


def test_add_bias_linear_rejected(tmp_path):
    path = write_blackmamba(tmp_path / "bm", config=blackmamba_config(add_bias_linear=True))
    with pytest.raises(ConfigError, match="add_bias_linear"):
        read_checkpoint(path)


def test_tied_output_layer_stored_anyway_is_accepted(tmp_path, ids):
    sd = blackmamba_tensors()
    sd["output_layer.weight"] = sd["embedding.word_embeddings.weight"].clone()
    model = load_model(write_blackmamba(tmp_path / "bm", sd=sd))
    assert rel_err(model(ids), oracle_logits(blackmamba_tensors(), ids)) <= 1e-4


def test_qmamba_writer_reproduces_the_exact_format(tmp_path):
    """``qmamba create --format blackmamba`` writes the same keys, dtypes, container and config keys."""
    from qmamba.checkpoints.random_init import create_checkpoint
    from qmamba.config import ModelConfig

    cfg = ModelConfig(d_model=D, layers=PLAN, vocab_size=VOCAB, d_state=N, d_conv=W, expand=EXPAND, ffn_hidden=FFN)
    create_checkpoint(cfg, "blackmamba", tmp_path / "ours", seed=0)
    ours = torch.load(tmp_path / "ours" / "pytorch_model.bin", weights_only=True)
    assert set(ours) == {"model"}
    reference = blackmamba_tensors()
    assert set(ours["model"]) == set(reference)
    for k, v in reference.items():
        assert ours["model"][k].dtype == torch.bfloat16 and ours["model"][k].shape == v.shape, k
    # each expert owns its storage, as in the published files
    e0 = ours["model"]["decoder.layers.1.mixer.local_experts.0.linear_fc1.weight"]
    assert e0.untyped_storage().nbytes() == e0.numel() * e0.element_size()
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected_keys = set(blackmamba_config()) - {"num_attention_heads", "layernorm_epsilon"}
    assert set(config) == expected_keys
    assert config["mamba_moe_layers"] == PLAN and config["swiglu"] is True
