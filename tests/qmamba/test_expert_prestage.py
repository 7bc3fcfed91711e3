"""MoE experts dequantized ahead on a side stream (qmamba/expert_prestage.py): when the policy takes it, and a
prefill on it equal to the prefill on the packed experts and to the reference backend."""

import dataclasses

import pytest
import torch

from qmamba.config import preset
from qmamba.expert_prestage import ExpertPrestage
from qmamba.graph_prefill import GraphPrefill
from qmamba.kernels.matmul_configs import DEFAULT_POLICY, using_policy
from qmamba.kernels.weights import FMT_FLOAT
from qmamba.moe import SwitchMoE
from qmamba.quant.formats import BinaryFormat, Int4Format, Int8Format
from qmamba.testing import quantize_rtn, random_model

ON = dataclasses.replace(DEFAULT_POLICY, prestage_experts_min_m=8)


def _model(device, fmt=Int4Format(32), backend="triton", cfg="tiny-blackmamba"):
    return quantize_rtn(random_model(preset(cfg), device), fmt).set_backend(backend)


def test_when_the_prestage_is_taken():
    model = _model(torch.device("cpu"))
    moe = tuple(b.index for b in model.blocks if not b.is_mamba)
    assert moe and DEFAULT_POLICY.prestage_experts_min_m is None
    assert ExpertPrestage.for_prefill(model, 4096) is None  # off by default
    with using_policy(ON):
        assert ExpertPrestage.for_prefill(model, 7) is None  # below the policy's minimum
        assert ExpertPrestage.for_prefill(model, 8).blocks == moe
        assert ExpertPrestage.for_prefill(model.set_backend("reference"), 8) is None  # its MoE is not Triton's
        assert ExpertPrestage.for_prefill(_model(torch.device("cpu"), BinaryFormat()), 8) is None  # 1-bit stacks
        assert ExpertPrestage.for_prefill(_model(torch.device("cpu"), cfg="tiny-mamba"), 8) is None  # no MoE
    with pytest.raises(ValueError, match="stacks"):
        ExpertPrestage(model.blocks, torch.float32, torch.device("cpu"), stacks=("fc3",))


def test_staged_experts_need_the_triton_backend():
    model = _model(torch.device("cpu"), backend="reference")
    moe = next(b.mixer for b in model.blocks if not b.is_mamba)
    with pytest.raises(ValueError, match="Triton backend"):
        moe(torch.zeros(2, model.config.d_model), experts=(None, None))


@pytest.mark.parametrize("fmt,stacks", [(Int4Format(32), ("fc1", "fc2")), (Int8Format(), ("fc1", "fc2")),
                                         (Int4Format(32), ("fc2",))], ids=["int4-g32", "int8", "int4-g32-fc2"])
@torch.no_grad()
def test_prestaged_prefill_equals_packed_and_reference(fmt, stacks, device, monkeypatch):
    """Every MoE block of the prefill runs on its staged float stacks (the float ones counted: fc1 stays packed
    when only fc2 is staged), and the logits and state equal the packed experts' prefill and the reference
    backend's."""
    model = _model(device, fmt)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), device=device)
    packed_logits, packed_state = model.prefill(ids)
    staged = []
    forward = SwitchMoE.forward

    def counting(self, h, experts=None):
        staged.append(None if experts is None else tuple(e.fmt == FMT_FLOAT for e in experts))
        return forward(self, h, experts)

    monkeypatch.setattr(SwitchMoE, "forward", counting)
    with using_policy(dataclasses.replace(ON, prestage_stacks=stacks)):
        logits, state = model.prefill(ids)
        model.prefill(ids[:1])  # 6 tokens: below the minimum, the packed experts
    n_moe = sum(not b.is_mamba for b in model.blocks)
    assert staged == [("fc1" in stacks, "fc2" in stacks)] * n_moe + [None] * n_moe
    torch.testing.assert_close(logits, packed_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.ssm_state, packed_state.ssm_state, atol=1e-5, rtol=1e-5)
    ref_logits, _ = model.set_backend("reference").prefill(ids)
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("stacks", [("fc1", "fc2"), ("fc2",)], ids=["both", "fc2"])
@torch.no_grad()
def test_prestaged_graph_prefill_on_gpu(stacks, device):
    """CUDA: the side stream forks from and joins the capturing stream; the captured prefill (bf16, replayed
    twice) gives the eager packed prefill's logits and state."""
    if device.type != "cuda":
        pytest.skip("side streams and CUDA graphs need a GPU (scripts/gpu_check.sh)")
    model = _model(device).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 64 + 16), device=device)
    whole_logits, whole_state = model.prefill(ids)
    with using_policy(dataclasses.replace(ON, prestage_stacks=stacks)):
        prefill = GraphPrefill(model, max_chunk=64, min_chunk=16)
        eager_logits, _ = model.prefill(ids)
        for _ in range(2):
            logits, state = prefill.prefill(ids)
            torch.testing.assert_close(logits.float(), whole_logits[:, -1:].float(), atol=3e-2, rtol=3e-2)
            torch.testing.assert_close(state.ssm_state, whole_state.ssm_state, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(eager_logits.float(), whole_logits.float(), atol=3e-2, rtol=3e-2)
