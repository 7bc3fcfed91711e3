"""Run an exported qmamba model with onnxruntime: prefill + decode with the recurrent state kept on the device.

    lm = OrtLM("model.onnx", device="cpu", threads=2)   # device="cuda": the CUDA execution provider
    logits, state = lm.prefill(input_ids)        # [B, L] -> logits [B, L, V] float32 torch on lm.device, OrtState
    logits = lm.step(token_ids, state)           # [B] -> [B, V]; state advanced in place
    tokens = generate_onnx("model.onnx", prompt_ids, 32, temperature=0)   # the qmamba.generation loop

The graph (see :mod:`qmamba.export.graph`) maps ``(input_ids, conv_state, ssm_state)`` to ``(logits,
conv_state_out, ssm_state_out)``. Calls go through IOBinding, so nothing crosses between host and device per token:

* the states are ``OrtValue`` s on the session's device; each call writes the new states into a second pair and
  the pairs swap (ping-pong: no host round trip, no per-step allocation);
* token ids and logits are torch tensors on ``lm.device`` bound by address (on CUDA: the GPU; on CPU: host memory
  that onnxruntime writes into directly), so sampling (:func:`qmamba.generation.sample`) runs where the logits are
  and matches the PyTorch path for a given seed. A decode step copies the sampled ids into the state's fixed input
  buffer and reuses one binding per state pair.

CUDA (``device="cuda"``, onnxruntime-gpu, see :mod:`qmamba.export.ort_providers`): a missing CUDA provider, or one
that fails to start, is a one-line :class:`~qmamba.export.ort_providers.ProviderError` (onnxruntime itself would fall
back to the CPU). The first call is profiled to learn where each node ran (``lm.placement``); nodes outside the CUDA
provider are reported as one warning line on ``warn``. ``cuda_graph=True`` asks onnxruntime to capture the decode
step as a CUDA graph (prefill runs uncaptured; one graph per state pair and batch size; each batch size keeps one
state, which ``new_state`` resets). Without a CUDA build of torch, token ids and logits go through host memory
(``bind_cpu_input`` and a copy of the logits per call).

``io_binding=False`` runs plain ``session.run`` with numpy arrays (host round trips every call): the simple path the
bound one is tested against.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qmamba.errors import TokenIdError, UserError

from .exporter import require
from .ort_providers import CUDA_EP, NodePlacement, ProviderError, device_index, session_providers

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_TORCH_TYPES = {np.float32: torch.float32, np.float16: torch.float16}


class OnnxModelError(UserError):
    """A file that is not a qmamba ONNX export, or options it cannot honour."""


@dataclass
class OrtState:
    """Recurrent state of a batch: the current ``conv``/``ssm`` values (``OrtValue`` s; numpy arrays on the plain
    path) and a spare pair the next call writes. ``ids`` / ``logits``: the fixed decode input and output buffers
    (torch, on the runner's device), ``bindings``: the decode binding of each pair (``parity`` says which pair is
    current), ``graph_ids``: the CUDA graph of each pair."""

    conv: object
    ssm: object
    spare_conv: object = None
    spare_ssm: object = None
    ids: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    bindings: dict = field(default_factory=dict)
    parity: int = 0
    graph_ids: tuple[int, int] | None = None

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        as_np = lambda v: v if isinstance(v, np.ndarray) else v.numpy()  # noqa: E731
        return as_np(self.conv), as_np(self.ssm)

    def swap(self) -> None:
        self.conv, self.spare_conv = self.spare_conv, self.conv
        self.ssm, self.spare_ssm = self.spare_ssm, self.ssm
        self.parity ^= 1


class OrtLM:
    """An exported model in an onnxruntime session (see module doc).

    ``placement``: profile the first call to learn where each node ran (default: on CUDA); ``warn``: where the
    warning about nodes outside the CUDA provider goes (``None``: nowhere)."""

    def __init__(self, path, device: str = "cpu", threads: int | None = None, providers: list | None = None,
                 session_options=None, warn=sys.stderr, *, io_binding: bool = True, cuda_graph: bool = False,
                 placement: bool | None = None):
        ort = require("onnxruntime", "running an ONNX model")
        self.path = str(path)
        if not Path(self.path).is_file():
            raise OnnxModelError(f"ONNX model not found: {self.path}")
        if providers is None:
            providers = session_providers(ort, device, cuda_graph)
        wants_cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA_EP for p in providers)
        if cuda_graph and not io_binding:
            raise ProviderError("CUDA graph capture needs the IOBinding path (io_binding=True)")
        so = session_options or ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        self._profile_dir = None
        if (wants_cuda if placement is None else placement) and session_options is None:
            self._profile_dir = Path(tempfile.mkdtemp(prefix="qmamba-ort-profile-"))
            so.enable_profiling = True
            so.profile_file_prefix = str(self._profile_dir / "profile")
        try:
            self.session = ort.InferenceSession(self.path, sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the message says it all
            self._drop_profile_dir()
            raise OnnxModelError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        if wants_cuda and self.session.get_providers()[0] != CUDA_EP:
            self._drop_profile_dir()
            raise ProviderError(f"onnxruntime {ort.__version__} could not start its CUDA execution provider (its log "
                                "above says why: usually CUDA or cuDNN libraries of the version it was built for are "
                                "missing); run with --device cpu, or see the README's onnxruntime-gpu notes")
        self.device_type = "cuda" if self.session.get_providers()[0] == CUDA_EP else "cpu"
        self.device_id = device_index(device) if self.device_type == "cuda" else 0
        self.io_binding = io_binding
        # token ids and logits as torch tensors bound by address: on the CPU always, on CUDA with a CUDA torch
        self._torch_io = io_binding and (self.device_type == "cpu" or torch.cuda.is_available())
        self.cuda_graph = cuda_graph
        if cuda_graph and not self._torch_io:
            raise ProviderError("CUDA graph capture needs a CUDA build of torch for the fixed input/output buffers")
        self.placement: NodePlacement | None = None
        self._warn = warn
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != {"input_ids", "conv_state", "ssm_state"}:
            self.close()
            raise OnnxModelError(f"{self.path} is not a qmamba export (inputs {sorted(inputs)})")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = json.loads(meta["qmamba.config"]) if "qmamba.config" in meta else {}
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        conv, ssm = inputs["conv_state"], inputs["ssm_state"]
        self.conv_shape, self.ssm_shape = conv.shape, ssm.shape   # [n, "batch", di, W] / [n, "batch", di, N]
        self.conv_dtype = _NP_TYPES[conv.type]
        self.logits_dtype = _NP_TYPES[self.session.get_outputs()[0].type]
        self._ort = ort
        self._graph_states: dict[int, OrtState] = {}

    def close(self) -> None:
        """End a profiling that never ran a call (onnxruntime would write its file at exit) and remove its folder."""
        if getattr(self, "_profile_dir", None) is not None:
            try:
                self.session.end_profiling()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            self._drop_profile_dir()

    def __del__(self):
        self.close()

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def device(self) -> torch.device:
        """Where token ids and logits live (sampling happens there)."""
        if self._torch_io and self.device_type == "cuda":
            return torch.device("cuda", self.device_id)
        return torch.device("cpu")

    # ---- state -----------------------------------------------------------------------------------------
    def _shape(self, template, batch):
        return [batch if isinstance(d, str) or d is None else int(d) for d in template]

    def new_state(self, batch: int) -> OrtState:
        """Zero states for ``batch`` sequences, on the session's device. With CUDA graphs, the one state of this
        batch size, reset (the captured graphs read and write its buffers)."""
        conv_shape, ssm_shape = self._shape(self.conv_shape, batch), self._shape(self.ssm_shape, batch)
        zeros_conv, zeros_ssm = np.zeros(conv_shape, self.conv_dtype), np.zeros(ssm_shape, np.float32)
        if not self.io_binding:
            return OrtState(zeros_conv, zeros_ssm)
        if batch in self._graph_states:
            state = self._graph_states[batch]
            state.conv.update_inplace(zeros_conv)
            state.ssm.update_inplace(zeros_ssm)
            return state
        value = self._ort.OrtValue
        state = OrtState(value.ortvalue_from_numpy(zeros_conv, self.device_type, self.device_id),
                         value.ortvalue_from_numpy(zeros_ssm, self.device_type, self.device_id),
                         value.ortvalue_from_shape_and_type(conv_shape, self.conv_dtype, self.device_type,
                                                            self.device_id),
                         value.ortvalue_from_shape_and_type(ssm_shape, np.float32, self.device_type, self.device_id))
        if self.cuda_graph:
            first = 2 * len(self._graph_states) + 1  # 0 is onnxruntime's own default id, -1 "no graph"
            state.graph_ids = (first, first + 1)
            self._graph_states[batch] = state
        return state

    # ---- running ---------------------------------------------------------------------------------------
    def check_token_ids(self, input_ids) -> None:
        ids = torch.as_tensor(input_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TokenIdError(f"input_ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise TokenIdError(f"token ids must be in [0, {self.vocab_size}); got range "
                               f"[{int(ids.min())}, {int(ids.max())}]")

    def _bind(self, ids: torch.Tensor, state: OrtState, logits: torch.Tensor | None):
        """An IOBinding of one call: ``ids`` in, ``logits`` out (torch buffers; ``None``: onnxruntime allocates on
        the device and the ids are copied from the host), the current states in and the spare ones out."""
        binding = self.session.io_binding()
        if logits is not None:
            binding.bind_input("input_ids", self.device_type, self.device_id, np.int64, list(ids.shape),
                               ids.data_ptr())
            binding.bind_output("logits", self.device_type, self.device_id, self.logits_dtype, list(logits.shape),
                                logits.data_ptr())
        else:
            binding.bind_cpu_input("input_ids", ids.cpu().numpy())
            binding.bind_output("logits", self.device_type, self.device_id)
        binding.bind_ortvalue_input("conv_state", state.conv)
        binding.bind_ortvalue_input("ssm_state", state.ssm)
        binding.bind_ortvalue_output("conv_state_out", state.spare_conv)
        binding.bind_ortvalue_output("ssm_state_out", state.spare_ssm)
        return binding

    def _run(self, binding, graph_id: int | None = None) -> None:
        if self.device.type == "cuda":  # torch's writes (the sampled ids) land before onnxruntime's stream reads
            torch.cuda.current_stream(self.device).synchronize()
        options = None
        if self.cuda_graph:
            options = self._ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(-1 if graph_id is None else graph_id))
        self.session.run_with_iobinding(binding, options)
        if self.device_type == "cuda":
            binding.synchronize_outputs()
        if self._profile_dir is not None:
            self._read_placement()

    def _read_placement(self) -> None:
        try:
            self.placement = NodePlacement.from_profile(self.session.end_profiling())
        finally:
            self._drop_profile_dir()
        message = self.placement.warning() if self.device_type == "cuda" else None
        if message and self._warn is not None:
            self._warn.write(message + "\n")

    def _drop_profile_dir(self) -> None:
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None

    def _run_plain(self, ids: torch.Tensor, state: OrtState) -> torch.Tensor:
        feeds = {"input_ids": ids.cpu().numpy().astype(np.int64), "conv_state": state.conv, "ssm_state": state.ssm}
        logits, state.conv, state.ssm = self.session.run(None, feeds)
        if self._profile_dir is not None:
            self._read_placement()
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def prefill(self, input_ids, state: OrtState | None = None, last_only: bool = False):
        """``input_ids [B, L]`` -> ``(logits [B, L, V] float32 torch on lm.device, state)``; ``last_only`` keeps
        only the last position (``[B, 1, V]``). ``state``: continue from it (chunked prefill)."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise OnnxModelError(f"input_ids must be [batch, length >= 1], got {tuple(ids.shape)}")
        self.check_token_ids(ids)
        state = state if state is not None else self.new_state(ids.shape[0])
        if not self.io_binding:
            logits = self._run_plain(ids, state)
        elif self._torch_io:
            ids = ids.to(self.device, torch.int64).contiguous()
            out = torch.empty((*ids.shape, self.vocab_size), dtype=_TORCH_TYPES[self.logits_dtype],
                              device=self.device)
            self._run(self._bind(ids, state, out))
            state.swap()
            logits = out.float()
        else:
            binding = self._bind(ids.to(torch.int64), state, None)
            self._run(binding)
            state.swap()
            logits = torch.from_numpy(np.asarray(binding.get_outputs()[0].numpy(), dtype=np.float32))
        return (logits[:, -1:] if last_only else logits), state

    def step(self, token_ids, state: OrtState) -> torch.Tensor:
        """One token per sequence: ``token_ids [B]`` -> logits ``[B, V]`` (float32 torch, a new tensor on
        ``lm.device``); state advanced."""
        ids = torch.as_tensor(token_ids).reshape(-1, 1)
        if not self.io_binding:
            return self._run_plain(ids, state)[:, 0]
        if not self._torch_io:
            binding = self._bind(ids.to(torch.int64), state, None)
            self._run(binding)
            state.swap()
            return torch.from_numpy(np.asarray(binding.get_outputs()[0].numpy()[:, 0], dtype=np.float32))
        if state.ids is None or state.ids.shape[0] != ids.shape[0]:
            state.ids = torch.zeros((ids.shape[0], 1), dtype=torch.int64, device=self.device)
            state.logits = torch.empty((ids.shape[0], 1, self.vocab_size), dtype=_TORCH_TYPES[self.logits_dtype],
                                       device=self.device)
            state.bindings = {}
        state.ids.copy_(ids)
        binding = state.bindings.get(state.parity)
        if binding is None:
            binding = state.bindings[state.parity] = self._bind(state.ids, state, state.logits)
        self._run(binding, state.graph_ids[state.parity] if state.graph_ids else None)
        state.swap()
        return state.logits[:, 0].to(torch.float32, copy=True)


class _GenerationAdapter:
    """What :func:`qmamba.generation.generate` needs from a model, backed by an :class:`OrtLM`."""

    def __init__(self, lm: OrtLM):
        self.lm = lm
        self.device = lm.device
        self.check_token_ids = lm.check_token_ids

    def prefill(self, input_ids):
        return self.lm.prefill(input_ids, last_only=True)

    def step(self, token_ids, state, check: bool = False):
        return self.lm.step(token_ids, state)


def generate_onnx(model_path, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None, stream=None, *,
                  device: str = "cpu", threads: int | None = None) -> torch.Tensor:
    """Generate with onnxruntime; same options and result (``[B, L + T]`` int64) as
    :func:`qmamba.generation.generate`. ``model_path``: an ``.onnx`` path or an :class:`OrtLM`. ``prompt_ids``:
    ``[B, L]`` tensor or nested lists (one list = one sequence)."""
    from qmamba.generation import generate

    lm = model_path if isinstance(model_path, OrtLM) else OrtLM(model_path, device=device, threads=threads)
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids[None]
    return generate(_GenerationAdapter(lm), ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, eos_token_id=eos_token_id, stream=stream)


def generate_cli(path, *, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                 seed: int | None, tokenizer: str | None, device: str, dtype: str | None, out=None, err=None,
                 threads: int | None = None) -> dict:
    """``qmamba generate PATH.onnx``: stream the continuation of ``prompt``; returns timing figures."""
    from qmamba.generation import check_sampling_options, stream_generate
    from qmamba.tokenizer import resolve_tokenizer

    from .exporter import export_tokenizer_file

    check_sampling_options(temperature, top_k, top_p)
    if Path(path).is_dir():
        raise OnnxModelError(f"{path} is a directory: the onnxruntime backend runs an exported model file; make one "
                             f"with: qmamba export {path} -o model.onnx")
    err_out = err or sys.stderr
    notice = lambda text: err_out.write(text + "\n")  # noqa: E731
    if tokenizer is not None:  # an explicit tokenizer is checked before the model is loaded
        resolve_tokenizer(None, tokenizer, None, notice=lambda _: None)
    lm = OrtLM(path, device=device, threads=threads, warn=err_out)
    if tokenizer is None:  # the export's own tokenizer file (named in its metadata, OUT.tokenizer.json)
        own = export_tokenizer_file(path, lm.session.get_modelmeta().custom_metadata_map)
        tokenizer = str(own) if own is not None else None
    tok = resolve_tokenizer(path, tokenizer, lm.vocab_size, notice=notice)
    exported = "fp16" if lm.logits_dtype == np.float16 else "fp32"
    if dtype is not None and dtype.lower() not in (exported, {"fp32": "float32", "fp16": "float16"}[exported]):
        raise OnnxModelError(f"{path} was exported in {exported}; --dtype {dtype} cannot change that (re-export)")
    stats = stream_generate(_GenerationAdapter(lm), tok, prompt, max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, label=lm.provider, out=out, err=err)
    device = f"cuda:{lm.device_id}" if lm.device_type == "cuda" else "cpu"
    return {**stats, "provider": lm.provider, "device": device,
            "dtype": {"fp32": "float32", "fp16": "float16"}[exported]}
