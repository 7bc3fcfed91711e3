"""Fused top-1 MoE against the PyTorch reference: all tokens on one expert, every expert used, an expert with no
tokens; decode (per-expert programs) and prefill (grouped tiles); float, int8 and int4 stacks."""

import pytest
import torch

from qmamba.kernels.fused_moe import (ACTIVATION_IDS, gated_act, gated_act_ref, moe_forward, moe_forward_ref,
                                      route_top1, route_top1_ref)
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.formats import Int4Format, Int8Format

E, D, FFN = 4, 40, 24


def experts(kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    fc1 = torch.randn(E, 2 * FFN, D, generator=g) / D ** 0.5
    fc2 = torch.randn(E, D, FFN, generator=g) / FFN ** 0.5
    if kind == "float":
        return PackedWeight.from_float(fc1.to(device)), PackedWeight.from_float(fc2.to(device))
    fmt = Int8Format() if kind == "int8" else Int4Format(16)
    pack = lambda w: {k: t.to(device) for k, t in fmt.quantize_rtn(w).items()}  # noqa: E731
    return fmt.kernel_weight(pack(fc1), 2 * FFN, D), fmt.kernel_weight(pack(fc2), D, FFN)


def router_for(assign, device):
    """A router whose bias forces the given expert choice pattern (None: random routing)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(E, D, generator=g).to(device) * 0.1
    b = torch.zeros(E, device=device)
    if assign is not None:
        b[:] = -20.0
        b[assign] = 20.0
    return w, b


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 7, 50])
@pytest.mark.parametrize("routing", ["one_expert", "random"])
def test_moe_matches_reference(kind, tokens, routing, device):
    fc1, fc2 = experts(kind, device)
    rw, rb = router_for(2 if routing == "one_expert" else None, device)
    x = torch.randn(tokens, D, device=device)
    idx, _ = route_top1_ref(x, rw, rb)
    if routing == "one_expert":
        assert (idx == 2).all()
    out = moe_forward(x, rw, rb, fc1, fc2, "gelu", True)
    torch.testing.assert_close(out, moe_forward_ref(x, rw, rb, fc1, fc2, "gelu", True), atol=1e-4, rtol=1e-4)


def test_every_expert_used_and_one_idle(device):
    fc1, fc2 = experts("int4", device)
    g = torch.Generator().manual_seed(5)
    rw = torch.randn(E, D, generator=g).to(device)
    rb = torch.tensor([0.0, -50.0, 0.0, 0.0], device=device)  # expert 1 never wins
    x = torch.randn(60, D, generator=g).to(device)
    idx, _ = route_top1_ref(x, rw, rb)
    assert set(idx.tolist()) == {0, 2, 3}
    for t in (60, 9):  # prefill tiles and decode path
        torch.testing.assert_close(moe_forward(x[:t], rw, rb, fc1, fc2, "silu", True),
                                   moe_forward_ref(x[:t], rw, rb, fc1, fc2, "silu", True), atol=1e-4, rtol=1e-4)
    rw2, rb2 = router_for(None, device)
    xs = torch.randn(200, D, device=device)
    assert set(route_top1_ref(xs, rw2, rb2)[0].tolist()) == set(range(E))
    torch.testing.assert_close(moe_forward(xs, rw2, rb2, fc1, fc2, "gelu", True),
                               moe_forward_ref(xs, rw2, rb2, fc1, fc2, "gelu", True), atol=1e-4, rtol=1e-4)


def test_routing_kernel(device):
    x = torch.randn(33, D, device=device)
    rw, rb = router_for(None, device)
    idx, w = route_top1(x, rw, rb)
    idx_ref, w_ref = route_top1_ref(x, rw, rb)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("activation", sorted(ACTIVATION_IDS))
@pytest.mark.parametrize("gated", [True, False])
def test_gated_activation(activation, gated, device):
    h = torch.randn(5, 2 * FFN, device=device) * 3
    torch.testing.assert_close(gated_act(h, activation, gated), gated_act_ref(h, activation, gated),
                               atol=1e-5, rtol=1e-5)
