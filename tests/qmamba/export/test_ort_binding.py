"""The onnxruntime runner's IOBinding path (torch buffers bound by address, ping-pong states, one reused decode
binding per state pair) against plain ``session.run``, on the CPU provider; the CUDA provider's error messages
(missing, failed to start) and the node placement report, testable without a GPU."""

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export_helpers import rtn_quantized, tiny_state_dict  # noqa: E402

from qmamba.cli import main  # noqa: E402
from qmamba.export import ort_providers  # noqa: E402
from qmamba.export.exporter import export_model  # noqa: E402
from qmamba.export.graph import ExportOptions  # noqa: E402
from qmamba.export.ort_providers import CPU_EP, CUDA_EP, NodePlacement, ProviderError  # noqa: E402
from qmamba.export.ort_runner import OrtLM, generate_onnx  # noqa: E402


@pytest.fixture(scope="module", params=["float", "int4"])
def onnx_path(request, tmp_path_factory):
    cfg, sd = tiny_state_dict("tiny-blackmamba")
    manifest = {}
    if request.param == "int4":
        sd, manifest = rtn_quantized(cfg, sd, "int4")
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_model(cfg, sd, manifest, out, ExportOptions(accuracy_level=0))
    return out


def host_bound(path) -> OrtLM:
    """The bound path as it runs on CUDA without a CUDA torch: ids copied from the host, logits allocated by ORT."""
    lm = OrtLM(path)
    lm._torch_io = False
    return lm


def test_bound_paths_equal_plain_session_run(onnx_path):
    plain = OrtLM(onnx_path, io_binding=False)
    prompt = torch.randint(0, plain.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    want_prefill, want_state = plain.prefill(prompt)
    want_steps = [plain.step(t, want_state) for t in ([3, 4], [5, 6], [7, 8])]
    want_tokens = generate_onnx(plain, prompt, 12, temperature=0)
    for lm in (OrtLM(onnx_path), host_bound(onnx_path)):
        logits, state = lm.prefill(prompt)
        assert torch.equal(logits, want_prefill)
        for t, want in zip(([3, 4], [5, 6], [7, 8]), want_steps):
            assert torch.equal(lm.step(torch.tensor(t), state), want)
        for got, want in zip(state.numpy(), want_state.numpy()):
            np.testing.assert_array_equal(got, want)
        assert torch.equal(generate_onnx(lm, prompt, 12, temperature=0), want_tokens)


def test_seeded_sampling_equal_on_both_paths(onnx_path):
    a = generate_onnx(OrtLM(onnx_path, io_binding=False), [[1, 2, 3]], 10, temperature=1.0, top_k=20, seed=3)
    b = generate_onnx(OrtLM(onnx_path), [[1, 2, 3]], 10, temperature=1.0, top_k=20, seed=3)
    assert torch.equal(a, b)


def test_decode_reuses_one_binding_per_state_pair(onnx_path):
    lm = OrtLM(onnx_path)
    _, state = lm.prefill(torch.tensor([[1, 2, 3]]))
    ids_ptr = None
    outputs = []
    for i in range(5):
        outputs.append(lm.step(torch.tensor([i + 1]), state))
        ids_ptr = ids_ptr or state.ids.data_ptr()
        assert state.ids.data_ptr() == ids_ptr
    assert sorted(state.bindings) == [0, 1]
    assert len({o.data_ptr() for o in outputs}) == 5 and all(o.data_ptr() != state.logits.data_ptr() for o in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # each step's logits survive the next step


def test_batch_size_change_rebuilds_the_decode_buffers(onnx_path):
    lm = OrtLM(onnx_path)
    plain = OrtLM(onnx_path, io_binding=False)
    for batch in (1, 3):
        prompt = torch.arange(2 * batch).reshape(batch, 2)
        _, state = lm.prefill(prompt)
        _, ref = plain.prefill(prompt)
        tokens = torch.arange(batch) + 5
        assert torch.equal(lm.step(tokens, state), plain.step(tokens, ref))


def test_missing_cuda_provider_is_one_clear_error(onnx_path, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_EP])
    with pytest.raises(ProviderError, match="no CUDA execution provider.*qmamba\\[gpu\\].*--device cpu"):
        OrtLM(onnx_path, device="cuda")
    result = CliRunner().invoke(main, ["generate", str(onnx_path), "--device", "cuda", "--prompt", "x", "-n", "2",
                                       "--tokenizer", str(onnx_path.with_name("none.json"))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["generate", str(onnx_path), "--device", "cuda", "-n", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no CUDA execution provider" in lines[0]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_cuda_provider_that_does_not_start_is_an_error(onnx_path, monkeypatch):
    """onnxruntime falls back to the CPU when the CUDA provider fails to start: the runner refuses instead."""
    if CUDA_EP in ort.get_available_providers():
        pytest.skip("a CUDA build of onnxruntime: the CUDA provider may start here")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    with pytest.raises(ProviderError, match="could not start its CUDA execution provider"):
        OrtLM(onnx_path, device="cuda")


def test_cuda_graph_needs_cuda(onnx_path):
    with pytest.raises(ProviderError, match="CUDA graph capture needs --device cuda"):
        OrtLM(onnx_path, cuda_graph=True)


def test_default_onnx_device_is_cpu_without_a_gpu(monkeypatch):
    from qmamba.cli.generate import _default_onnx_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _default_onnx_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_EP])
    assert _default_onnx_device() == "cpu"
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    assert _default_onnx_device() == "cuda"


def test_placement_from_the_profiled_first_call(onnx_path):
    lm = OrtLM(onnx_path, placement=True)
    assert lm.placement is None and lm._profile_dir.is_dir()
    profile_dir = lm._profile_dir
    lm.prefill(torch.tensor([[1, 2]]))
    placement = lm.placement
    assert set(placement.nodes) == {CPU_EP} and placement.count() > 20 and placement.copies == 0
    assert "LinearAttention" in placement.nodes[CPU_EP]
    assert placement.warning(CPU_EP) is None
    assert placement.warning(CUDA_EP) is None  # nothing crossed between host and device
    assert placement.elsewhere(CUDA_EP) == placement.nodes[CPU_EP]
    assert not profile_dir.exists() and lm._profile_dir is None
    lm.prefill(torch.tensor([[1, 2]]))  # profiling ended: no new file, the placement stays
    assert lm.placement is placement


def test_profiling_that_never_ran_leaves_nothing(onnx_path):
    lm = OrtLM(onnx_path, placement=True)
    profile_dir = lm._profile_dir
    assert profile_dir.is_dir()
    del lm
    assert not profile_dir.exists()


def test_placement_is_not_profiled_on_cpu_by_default(onnx_path):
    lm = OrtLM(onnx_path)
    lm.prefill(torch.tensor([[1]]))
    assert lm.placement is None and lm._profile_dir is None


def test_node_placement_reads_providers_and_copies(tmp_path):
    def node(name, provider, op):
        return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"provider": provider, "op_name": op}}

    events = [node("a", CUDA_EP, "MatMulNBits"), node("a", CUDA_EP, "MatMulNBits"),  # one node, two runs
              node("b", CUDA_EP, "MemcpyToHost"), node("c", CPU_EP, "NonZero"), node("d", CPU_EP, "Shape"),
              node("e", CPU_EP, "Shape"), {"cat": "Session", "name": "model_run", "args": {}}]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    placement = NodePlacement.from_profile(path)
    assert placement.nodes == {CPU_EP: {"Shape": 2, "NonZero": 1}, CUDA_EP: {"MatMulNBits": 1, "MemcpyToHost": 1}}
    assert placement.copies == 1 and placement.count() == 5 and placement.count(CPU_EP) == 3
    assert placement.elsewhere(CUDA_EP) == {"Shape": 2, "NonZero": 1}
    warning = placement.warning(CUDA_EP)
    assert "3 of 5 nodes run outside CUDAExecutionProvider (Shape x2, NonZero x1), with 1 host<->device" in warning
    assert "\n" not in warning
    shapes_only = NodePlacement({CUDA_EP: {"MatMulNBits": 3}, CPU_EP: {"Shape": 2}})
    assert shapes_only.warning(CUDA_EP) is None and shapes_only.elsewhere(CUDA_EP) == {"Shape": 2}


def test_cuda_library_discovery(tmp_path, monkeypatch):
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
    (lib / "libcudart.so.13").write_bytes(b"not a library")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert ort_providers.nvidia_library_dirs() == [lib, tmp_path / "nvidia" / "cudnn" / "lib"]
    monkeypatch.setattr(ort_providers, "ort_cuda_version", lambda _: "13.0")
    assert ort_providers.preload_cuda_libraries(ort) == []  # a broken file is skipped, not fatal
    monkeypatch.setattr(ort_providers, "ort_cuda_version", lambda _: "")
    assert ort_providers.preload_cuda_libraries(ort) == []  # a CPU build loads nothing
