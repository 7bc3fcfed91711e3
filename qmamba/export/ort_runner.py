"""Run an exported qmamba model with onnxruntime: prefill + decode with the recurrent state kept on the device.

    lm = OrtLM("model.onnx", device="cpu", threads=2)
    logits, state = lm.prefill(input_ids)        # [B, L] -> logits [B, L, V] (torch, host), OrtState
    logits = lm.step(token_ids, state)           # [B] -> [B, V]; state advanced in place
    tokens = generate_onnx("model.onnx", prompt_ids, 32, temperature=0)   # the qmamba.generation loop

The graph (see :mod:`qmamba.export.graph`) maps ``(input_ids, conv_state, ssm_state)`` to ``(logits,
conv_state_out, ssm_state_out)``. Calls go through IOBinding: the states are ``OrtValue`` s on the session's device
and each step writes the new states into a second pair of buffers, then the pairs swap (no host round trip and no
per-step allocation of state buffers). Only the logits come back to the host, for sampling with
:func:`qmamba.generation.sample` (so sampling matches the PyTorch path for a given seed).

CUDA: with onnxruntime-gpu installed and ``device="cuda"``, the CUDA EP is used; otherwise the CPU EP (a requested
but unavailable CUDA EP falls back to CPU with a warning on stderr, as onnxruntime itself does).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qmamba.errors import TokenIdError, UserError

from .exporter import require

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxModelError(UserError):
    """A file that is not a qmamba ONNX export, or options it cannot honour."""


@dataclass
class OrtState:
    """Recurrent state of a batch: the current ``conv``/``ssm`` OrtValues and a spare pair the next call writes."""

    conv: object
    ssm: object
    spare_conv: object = None
    spare_ssm: object = None

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        return self.conv.numpy(), self.ssm.numpy()

    def swap(self) -> None:
        self.conv, self.spare_conv = self.spare_conv, self.conv
        self.ssm, self.spare_ssm = self.spare_ssm, self.ssm


class OrtLM:
    """An exported model in an onnxruntime session (see module doc)."""

    def __init__(self, path, device: str = "cpu", threads: int | None = None, providers: list | None = None,
                 session_options=None, warn=sys.stderr):
        ort = require("onnxruntime", "running an ONNX model")
        self.path = str(path)
        so = session_options or ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if str(device).startswith("cuda"):
                if "CUDAExecutionProvider" in ort.get_available_providers():
                    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
                elif warn is not None:
                    warn.write("warning: onnxruntime has no CUDA execution provider here (install onnxruntime-gpu); "
                               "running on CPU\n")
        if not Path(self.path).is_file():
            raise OnnxModelError(f"ONNX model not found: {self.path}")
        try:
            self.session = ort.InferenceSession(self.path, sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the message says it all
            raise OnnxModelError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.device_type = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = int(str(device).split(":")[1]) if ":" in str(device) and self.device_type == "cuda" else 0
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != {"input_ids", "conv_state", "ssm_state"}:
            raise OnnxModelError(f"{self.path} is not a qmamba export (inputs {sorted(inputs)})")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = json.loads(meta["qmamba.config"]) if "qmamba.config" in meta else {}
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        conv, ssm = inputs["conv_state"], inputs["ssm_state"]
        self.conv_shape, self.ssm_shape = conv.shape, ssm.shape   # [n, "batch", di, W] / [n, "batch", di, N]
        self.conv_dtype = _NP_TYPES[conv.type]
        self.logits_dtype = _NP_TYPES[self.session.get_outputs()[0].type]
        self._ort = ort

    # ---- state -----------------------------------------------------------------------------------------
    def _shape(self, template, batch):
        return [batch if isinstance(d, str) or d is None else int(d) for d in template]

    def _empty(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type, self.device_id)

    def new_state(self, batch: int) -> OrtState:
        """Zero states for ``batch`` sequences, on the session's device."""
        conv_shape, ssm_shape = self._shape(self.conv_shape, batch), self._shape(self.ssm_shape, batch)
        to_dev = self._ort.OrtValue.ortvalue_from_numpy
        return OrtState(to_dev(np.zeros(conv_shape, self.conv_dtype), self.device_type, self.device_id),
                        to_dev(np.zeros(ssm_shape, np.float32), self.device_type, self.device_id),
                        self._empty(conv_shape, self.conv_dtype), self._empty(ssm_shape, np.float32))

    # ---- running ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where token ids and logits live (sampling happens on the host)

    def check_token_ids(self, input_ids) -> None:
        ids = torch.as_tensor(input_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TokenIdError(f"input_ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise TokenIdError(f"token ids must be in [0, {self.vocab_size}); got range "
                               f"[{int(ids.min())}, {int(ids.max())}]")

    def run(self, input_ids: np.ndarray, state: OrtState):
        """One graph call on ``input_ids [B, L]`` (int64): returns the logits OrtValue; ``state`` advances."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_ortvalue_input("conv_state", state.conv)
        binding.bind_ortvalue_input("ssm_state", state.ssm)
        binding.bind_output("logits", self.device_type, self.device_id)
        binding.bind_ortvalue_output("conv_state_out", state.spare_conv)
        binding.bind_ortvalue_output("ssm_state_out", state.spare_ssm)
        self.session.run_with_iobinding(binding)
        state.swap()
        return binding.get_outputs()[0]

    def prefill(self, input_ids, state: OrtState | None = None, last_only: bool = False):
        """``input_ids [B, L]`` -> ``(logits [B, L, V] float32 torch on the host, state)``; ``last_only`` keeps
        only the last position (``[B, 1, V]``). ``state``: continue from it (chunked prefill)."""
        ids = torch.as_tensor(input_ids).cpu()
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise OnnxModelError(f"input_ids must be [batch, length >= 1], got {tuple(ids.shape)}")
        self.check_token_ids(ids)
        state = state if state is not None else self.new_state(ids.shape[0])
        logits = self.run(ids.numpy().astype(np.int64), state).numpy()
        if last_only:
            logits = logits[:, -1:]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)), state

    def step(self, token_ids, state: OrtState) -> torch.Tensor:
        """One token per sequence: ``token_ids [B]`` -> logits ``[B, V]`` (float32 torch); state advanced."""
        ids = torch.as_tensor(token_ids).reshape(-1, 1).cpu().numpy().astype(np.int64)
        logits = self.run(ids, state).numpy()
        return torch.from_numpy(np.asarray(logits[:, 0], dtype=np.float32))


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
    provider = lm.session.get_providers()[0]
    stats = stream_generate(_GenerationAdapter(lm), tok, prompt, max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, label=provider, out=out, err=err)
    return {**stats, "provider": provider, "dtype": {"fp32": "float32", "fp16": "float16"}[exported]}
