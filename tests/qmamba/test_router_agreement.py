"""Router agreement on every backend and MoE layout (issue 17): the Triton MoE forward routes inside its fused
kernels without calling the router module, and ``eval --compare`` on the GPU used to report NaN with an empty
per-layer table. Each test compares the recorded routing with a reference written here: the residual stream is
walked block by block with the model's own modules, and at each MoE block the top-1 expert is the argmax of
``x @ W_router^T + b`` in float64 (W_router decoded from the module: float, or the quantized router's weight).

On CPU the Triton backend runs under TRITON_INTERPRET=1 (tests/conftest.py); on the GPU machine
(QMAMBA_TEST_DEVICE=cuda, scripts/gpu_check.sh) the same tests run the compiled kernels, and the CLI test runs
``qmamba eval --compare A B --device cuda`` (bfloat16, Triton)."""

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from qmamba.config import ModelConfig, preset
from qmamba.eval import perplexity, record_routing, router_agreement
from qmamba.quant.formats import BinaryFormat, Int4Format, Int8Format
from qmamba.quant.modules import swap_quantized_modules
from qmamba.testing import quantize_rtn, random_model, train_byte_bpe

# MoE first, two MoE blocks in a row with different expert counts, ungated ReLU experts
ODD_LAYOUT = ModelConfig(d_model=64, layers=["3", "r", "5", "8"], vocab_size=512, ffn_hidden=48, d_state=8,
                         expert_gated=False, expert_activation="relu", final_norm="rmsnorm")


def build_pair(layout: str, device, dtype=torch.float32):
    """``(A, B)``: a random model in ``layout`` and a copy whose router biases are perturbed (agreement in (0, 1))."""
    if layout == "alternating-float":
        a = random_model(preset("tiny-blackmamba"), device)
    elif layout == "moe-first-int4-int8router":  # int4 experts, the first router int8 (a QuantLinear)
        a = quantize_rtn(random_model(ODD_LAYOUT, device), Int4Format(32))
        swap_quantized_modules(a, {"layers.0.mixer.router": Int8Format()}, rtn=True)
    elif layout == "binary-experts":  # the 1-bit MoE kernels (kernels/binary_matmul.py)
        a = quantize_rtn(random_model(preset("tiny-blackmamba"), device), BinaryFormat(), sensitive_fmt=Int4Format(32))
    else:
        raise ValueError(layout)
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in b.config.moe_layer_ids:
            bias = b.layers[i].mixer.router.bias
            bias.add_(torch.randn(bias.shape, generator=gen).to(bias) * 0.6)
    return a.to(dtype).eval(), b.to(dtype).eval()


def set_moe_backend(model, backend: str):
    """``backend`` for the MoE blocks, the reference ops for the Mamba blocks (the Triton scan under the CPU
    interpreter is what makes these tests slow; the CLI test below runs the whole model on Triton)."""
    model.set_backend("reference")
    for i in model.config.moe_layer_ids:
        for module in model.layers[i].mixer.modules():
            if hasattr(module, "backend"):
                module.backend = backend
    return model


def router_weight_by_hand(router) -> torch.Tensor:
    if isinstance(router, nn.Linear):
        return router.weight.detach().double()
    return router.dequantized_weight(torch.float64)


@torch.no_grad()
def routes_by_hand(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{MoE layer: top-1 expert [B, L]}`` of ``ids [B, L]``: block by block, float64 argmax of the router logits."""
    h = model.embedding(ids).to(model.compute_dtype)
    residual, routes = None, {}
    for i, block in enumerate(model.layers):
        residual = h.float() if residual is None else residual + h.float()
        x = block.norm(residual, out_dtype=model.compute_dtype)
        if block.kind == "mamba":
            h = block.mixer(x)[0]
        else:
            router = block.mixer.router
            logits = x.double() @ router_weight_by_hand(router).t() + router.bias.double()
            routes[i] = logits.argmax(-1).cpu()
            h = block.mixer(x)
    return routes


def agreement_by_hand(ra: dict, rb: dict):
    per_layer = {i: (ra[i] == rb[i]).double().mean().item() for i in ra}
    same = sum(int((ra[i] == rb[i]).sum()) for i in ra)
    return same / sum(ra[i].numel() for i in ra), per_layer


LAYOUTS = ["alternating-float", "moe-first-int4-int8router", "binary-experts"]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_router_agreement_matches_hand_routing(layout, backend, device):
    a, b = (set_moe_backend(m, backend) for m in build_pair(layout, device))
    ids = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    want_a, want_b = routes_by_hand(a, ids), routes_by_hand(b, ids)
    got_a = record_routing(a, ids)
    assert set(got_a) == set(a.config.moe_layer_ids)
    for i in got_a:  # token by token: what the backend's forward decided
        assert torch.equal(got_a[i].long(), want_a[i].reshape(-1)), i
    res = router_agreement(a, b, ids)
    overall, per_layer = agreement_by_hand(want_a, want_b)
    assert math.isfinite(res["overall"]) and 0.0 < overall < 1.0  # the perturbation moves some tokens, not all
    assert res["overall"] == overall and res["per_layer"] == per_layer and res["tokens"] == ids.numel()


@pytest.mark.parametrize("layout", ["moe-first-int4-int8router"])
def test_perplexity_records_routing_at_scored_positions(layout, device):
    """Overlapping windows (stride < seq_len) and a short last window padded in its batch: the routing of every
    position whose prediction is scored, once each, in text order, from the window that scores it."""
    a = set_moe_backend(build_pair(layout, device)[0], "triton")
    ids = torch.randint(0, a.config.vocab_size, (19,), generator=torch.Generator().manual_seed(3))
    routes = {}
    res = perplexity(a, ids, seq_len=8, stride=4, batch_size=2, progress=False, routes=routes)
    # windows [0, 8) [4, 12) [8, 16) [12, 19): the first scores inputs 0..6, each later one the inputs after
    # the previous window's last scored input, up to its own second-to-last position
    want: dict[int, list] = {}
    scored_until = 0
    for begin in (0, 4, 8, 12):
        end = min(begin + 8, 19)
        hand = routes_by_hand(a, ids[None, begin:end].to(device))
        for i, r in hand.items():
            want.setdefault(i, []).append(r[0, scored_until - begin:end - 1 - begin])
        scored_until = end - 1
    assert res["tokens"] == 18
    for i in a.config.moe_layer_ids:
        assert torch.equal(routes[i].long(), torch.cat(want[i])), i


def _write_pair(tmp_path, device):
    """Checkpoints A (a random tiny BlackMamba) and B (A, router biases perturbed), with one tokenizer."""
    from qmamba import load_model
    from qmamba.checkpoints.native import save_checkpoint
    from qmamba.checkpoints.random_init import create_checkpoint

    train_byte_bpe(tmp_path / "tokenizer.json", ["the quick brown fox jumps over the lazy dog " * 50])
    # MoE first and last around one Mamba block (the Triton scan is the slow part under the CPU interpreter)
    cfg = ModelConfig(d_model=64, layers=["4", "r", "4"], vocab_size=512, ffn_hidden=96, d_state=8)
    create_checkpoint(cfg, "qmamba", tmp_path / "a", tokenizer_file=tmp_path / "tokenizer.json")
    b = load_model(tmp_path / "a")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in b.config.moe_layer_ids:
            bias = b.layers[i].mixer.router.bias
            bias.add_(torch.randn(bias.shape, generator=gen).to(bias) * 0.6)
    save_checkpoint(b, b.config, tmp_path / "b", tokenizer_file=tmp_path / "tokenizer.json")
    text = tmp_path / "t.txt"
    text.write_text("the lazy dog jumps over the quick brown fox. " * 20)
    return tmp_path / "a", tmp_path / "b", text


def _check_compare_cli(tmp_path, device, dtype, args):
    from qmamba import load_model
    from qmamba.cli import main
    from qmamba.tokenizer import load_tokenizer

    a_dir, b_dir, text = _write_pair(tmp_path, device)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--compare", str(a_dir), str(b_dir), "--data", str(text), "--seq-len", "8",
                                  "--max-tokens", "24", "--json", str(out), "--no-progress", *args])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["router_agreement"]
    # by hand: three non-overlapping windows of 8 tokens in one batch; each scores its first 7 positions
    ids = torch.tensor(load_tokenizer(tmp_path / "tokenizer.json").encode(text.read_text())[:24]).reshape(3, 8)
    models = [load_model(p, device=device, dtype=dtype, backend="triton") for p in (a_dir, b_dir)]
    hand = [{i: r[:, :7] for i, r in routes_by_hand(m, ids.to(device)).items()} for m in models]
    overall, per_layer = agreement_by_hand(*hand)
    assert 0.0 < overall < 1.0
    assert res["overall"] == overall and res["tokens"] == 21
    assert {int(i): v for i, v in res["per_layer"].items()} == per_layer
    assert f"router top-1 agreement B vs A: {100 * overall:.2f}% (21 tokens" in r.output
    assert "per layer: " + ", ".join(f"L{i} {100 * v:.2f}%" for i, v in per_layer.items()) in r.output


def test_compare_cli_router_agreement_triton(tmp_path, device):
    """``qmamba eval --compare A B --backend triton`` (on CPU: the Triton interpreter; on the GPU machine: CUDA,
    float32): a finite agreement and a per-layer table, equal to the hand routing."""
    _check_compare_cli(tmp_path, device, torch.float32,
                       ["--backend", "triton", "--device", device.type, "--dtype", "float32"])


def test_compare_cli_router_agreement_on_gpu(tmp_path, device):
    """The issue's command as users run it: ``qmamba eval --compare A B --device cuda`` (defaults: bfloat16,
    Triton)."""
    if device.type != "cuda":
        pytest.skip("needs a GPU (QMAMBA_TEST_DEVICE=cuda, scripts/gpu_check.sh)")
    _check_compare_cli(tmp_path, device, torch.bfloat16, ["--device", "cuda"])
