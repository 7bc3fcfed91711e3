"""Exported float models against the PyTorch reference (MambaLM): prefill and 8 decode steps, batch 2, both scan
bodies, a tiny BlackMamba and a tiny Mamba; the portable graph under onnx.reference; fp16; chunked prefill."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export_helpers import rel_err, tiny_state_dict, torch_model  # noqa: E402

from qmamba.export.exporter import export_model  # noqa: E402
from qmamba.export.graph import ExportOptions, build_model_proto  # noqa: E402
from qmamba.export.ort_runner import OrtLM, generate_onnx  # noqa: E402
from qmamba.generation import generate  # noqa: E402

PRESETS = ["tiny-blackmamba", "tiny-mamba"]
BODIES = ["linear-attention", "scan"]
TOL = 1e-4


@pytest.fixture(scope="module", params=PRESETS)
def checkpoint(request):
    cfg, sd = tiny_state_dict(request.param)
    return cfg, sd, torch_model(cfg, sd)


def export(tmp_path_factory, cfg, sd, manifest=None, **options):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_model(cfg, sd, manifest, out, ExportOptions(**options))
    return out


@pytest.mark.parametrize("body", BODIES)
def test_prefill_and_decode_match_pytorch(tmp_path_factory, checkpoint, body):
    cfg, sd, model = checkpoint
    lm = OrtLM(export(tmp_path_factory, cfg, sd, scan=body))
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    logits, state = lm.prefill(prompt)
    ref, ref_state = model.prefill(prompt)
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) <= TOL
    conv, ssm = state.numpy()
    assert rel_err(conv, ref_state.conv_state) <= TOL and rel_err(ssm, ref_state.ssm_state) <= TOL
    for _ in range(8):
        token = torch.randint(0, cfg.vocab_size, (2,), generator=g)
        assert rel_err(lm.step(token, state), model.step(token, ref_state)) <= TOL
    conv, ssm = state.numpy()
    assert rel_err(conv, ref_state.conv_state) <= TOL and rel_err(ssm, ref_state.ssm_state) <= TOL


def test_chunked_prefill_equals_one_prefill(tmp_path_factory, checkpoint):
    cfg, sd, _ = checkpoint
    lm = OrtLM(export(tmp_path_factory, cfg, sd))
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    whole, _ = lm.prefill(ids)
    first, state = lm.prefill(ids[:, :4])
    second, state = lm.prefill(ids[:, 4:], state)
    assert rel_err(torch.cat([first, second], 1), whole) <= TOL


def test_portable_graph_runs_in_onnx_reference(checkpoint):
    from onnx.reference import ReferenceEvaluator

    cfg, sd, model = checkpoint
    proto = build_model_proto(cfg, sd, {}, ExportOptions(scan="scan"))
    assert {node.domain for node in proto.graph.node} <= {"", "qmamba"}  # standard ops + the custom node only
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    n, b = cfg.n_mamba_layers, 2
    logits, conv, ssm = ReferenceEvaluator(proto).run(None, {
        "input_ids": ids.numpy(), "conv_state": np.zeros((n, b, cfg.d_inner, cfg.d_conv), np.float32),
        "ssm_state": np.zeros((n, b, cfg.d_inner, cfg.d_state), np.float32)})
    ref, ref_state = model.prefill(ids)
    assert rel_err(logits, ref) <= TOL and rel_err(ssm, ref_state.ssm_state) <= TOL


def test_fp16_export_close_to_fp32_reference(tmp_path_factory, checkpoint):
    cfg, sd, model = checkpoint
    lm = OrtLM(export(tmp_path_factory, cfg, sd, dtype="fp16"))
    assert lm.logits_dtype == np.float16 and lm.conv_dtype == np.float16
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    logits, state = lm.prefill(ids)
    ref, ref_state = model.prefill(ids)
    assert rel_err(logits, ref) < 1e-2
    token = ids[:, -1]
    assert rel_err(lm.step(token, state), model.step(token, ref_state)) < 1e-2


def test_greedy_generation_equals_pytorch(tmp_path_factory, checkpoint):
    cfg, sd, model = checkpoint
    path = export(tmp_path_factory, cfg, sd)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(6))
    ours = generate_onnx(path, prompt, 16, temperature=0)
    theirs = generate(model, prompt, 16, temperature=0)
    assert torch.equal(ours, theirs)


def test_seeded_sampling_is_reproducible(tmp_path_factory, checkpoint):
    cfg, sd, _ = checkpoint
    lm = OrtLM(export(tmp_path_factory, cfg, sd))
    prompt = [[1, 2, 3]]
    a = generate_onnx(lm, prompt, 10, temperature=1.0, top_k=20, seed=3)
    b = generate_onnx(lm, prompt, 10, temperature=1.0, top_k=20, seed=3)
    assert torch.equal(a, b) and a.shape == (1, 13)


def test_decode_reuses_two_state_buffers(tmp_path_factory, checkpoint):
    """IOBinding: each step writes into the spare pair of state OrtValues and swaps (no new state buffers)."""
    cfg, sd, _ = checkpoint
    lm = OrtLM(export(tmp_path_factory, cfg, sd))
    _, state = lm.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    buffers = {id(state.conv), id(state.ssm), id(state.spare_conv), id(state.spare_ssm)}
    previous = state.conv
    lm.step(torch.tensor([7, 8]), state)
    assert state.spare_conv is previous
    lm.step(torch.tensor([9, 10]), state)
    assert {id(state.conv), id(state.ssm), id(state.spare_conv), id(state.spare_ssm)} == buffers


def test_moe_router_weight_scales_each_layer_once(checkpoint):
    """The router weight multiplies the MoE output once per layer, after the scatter (not once per expert: on a GPU
    every node costs a launch, and the per-expert form was 4 nodes per expert, ~520 of BlackMamba-2.8B's graph)."""
    cfg, sd, _ = checkpoint
    proto = build_model_proto(cfg, sd, {}, ExportOptions())
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    router_weights = [node.output[0] for node in proto.graph.node if node.op_type == "ReduceMax"]
    assert len(router_weights) == len(cfg.moe_layer_ids)
    assert all(consumers[w] == ["Unsqueeze"] for w in router_weights), [consumers[w] for w in router_weights]
