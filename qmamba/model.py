"""The BlackMamba / Mamba language model: embedding -> blocks (RMSNorm + mixer, fp32 residual) -> final norm
-> tied head. A block's mixer is a :class:`MambaMixer` or a :class:`SwitchMoE`, by the config's layer plan.
``MambaLM.blocks`` lists the blocks once (:mod:`qmamba.block_plan`: kind, state slot, modules) for every walk.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qmamba.block_plan import MAMBA, ModelBlock, block_plan
from qmamba.config import ModelConfig
from qmamba.errors import TokenIdError
from qmamba.mamba_mixer import MambaMixer
from qmamba.moe import SwitchMoE, decode_step
from qmamba.norms import RMSNorm, make_final_norm
from qmamba.ops import BACKENDS
from qmamba.state import InferenceState


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, n_experts: int):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg) if kind == MAMBA else SwitchMoE(cfg, n_experts)


class MambaLM(nn.Module):
    """Call ``model(input_ids [B, L])`` for logits ``[B, L, V]``; ``prefill``/``step`` carry the recurrent state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, kind, n) for kind, n in cfg.layer_kinds)
        self.norm_f = make_final_norm(cfg.final_norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        # the blocks once, in forward order, with their kind and state slot (a tuple: not registered as modules)
        self.blocks: tuple[ModelBlock, ...] = tuple(
            ModelBlock(spec.index, spec.kind, spec.n_experts, spec.slot, module)
            for spec, module in zip(block_plan(cfg), self.layers))
        # prefills run the MoE's int4 experts on int8 activations (W4A8, CUDA kernels; see _prefill): set by
        # qmamba.load_model from the checkpoint's check (qmamba/calib/int8_check.py) or the caller's choice
        self.int8_activations = False

    # ---- configuration -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[0].norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def set_backend(self, backend: str) -> "MambaLM":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        for module in self.modules():  # mixers and quantized modules all carry a `backend` attribute
            if module is not self and hasattr(module, "backend"):
                module.backend = backend
        return self

    def new_state(self, batch: int) -> InferenceState:
        return InferenceState.zeros(self.config, batch, self.device, self.compute_dtype)

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TokenIdError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise TokenIdError(f"token ids must be in [0, {self.config.vocab_size}); got range "
                               f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def _grad_context(self):
        """``torch.no_grad()`` while a block runs on the Triton backend, whose kernels have no backward: recording
        autograd nodes for them (and keeping every projection's activations for a backward that would raise) is
        pure overhead on the inference path. The reference backend keeps grad mode as the caller set it (the
        calibration trainers differentiate through it)."""
        if torch.is_grad_enabled() and any(getattr(b.mixer, "backend", None) == "triton" for b in self.blocks):
            return torch.no_grad()
        return contextlib.nullcontext()

    # ---- running -------------------------------------------------------------------------------------
    def _logits(self, residual, h, last_only: bool = False):
        """The head over ``norm_f(residual + h)`` (the last block's output added to the stream); ``last_only``: of
        the last position only (``[B, L, d]`` inputs)."""
        if last_only:
            residual, h = residual[:, -1:], h[:, -1:]
        _, x = self.norm_f.add_forward(residual, h, self.compute_dtype)
        return self.lm_head(x)

    def prefill(self, input_ids: torch.Tensor, state: InferenceState | None = None, check: bool = True,
                last_only: bool = False):
        """Parallel forward over ``input_ids [B, L]``; returns ``(logits [B, L, V], state)``.

        ``state`` (if given) is the state after earlier tokens; the returned state is new tensors.
        ``last_only``: logits of the last position only (``[B, 1, V]``), what generation needs; skips the head
        over the whole prompt (for a 2048-token prompt and a 50k vocabulary, 0.4 GB of fp32 logits).
        """
        if check:
            self.check_token_ids(input_ids)
        with self._grad_context():
            return self._prefill(input_ids, state, last_only)

    def _prefill(self, input_ids, state, last_only):
        with self._prefill_policy():  # CUDA, int8_activations: the MoE's int4 experts on W4A8
            return self._prefill_blocks(input_ids, state, last_only)

    def _prefill_blocks(self, input_ids, state, last_only):
        batch = input_ids.shape[0]
        state = state if state is not None else self.new_state(batch)
        conv_out, ssm_out = torch.empty_like(state.conv_state), torch.empty_like(state.ssm_state)
        h = self.embedding(input_ids).to(self.compute_dtype)
        residual = None
        for block in self.blocks:
            residual, x = block.norm.add_forward(residual, h, self.compute_dtype)
            if block.is_mamba:
                s = block.slot
                h, conv_out[s], ssm_out[s] = block.mixer(x, state.conv_state[s], state.ssm_state[s])
            else:
                h = block.mixer(x)
        return self._logits(residual, h, last_only), InferenceState(conv_out, ssm_out)

    @property
    def int8_prefill(self) -> bool:
        """Whether this model's prefills actually run on int8 activations: ``int8_activations`` and the Triton
        backend on CUDA (elsewhere the flag changes nothing)."""
        return (self.int8_activations and self.device.type == "cuda"
                and all(getattr(b.mixer, "backend", None) == "triton" for b in self.blocks))

    def _prefill_policy(self):
        """With ``int8_activations``, the matmul policy that sends the MoE's int4 expert stacks of a prefill (64
        rows and more) to the W4A8 kernels (:func:`qmamba.kernels.matmul_configs.int8_activations`; the Triton
        backend on CUDA only, the reference path multiplies the inputs as they are)."""
        if not self.int8_activations:
            return contextlib.nullcontext()
        from qmamba.kernels.matmul_configs import int8_activations  # lazily: the Triton path only

        return int8_activations()

    def step(self, input_ids: torch.Tensor, state: InferenceState, check: bool = True):
        """One token per sequence: ``input_ids [B]`` -> logits ``[B, V]``; ``state`` is updated in place."""
        if check:
            self.check_token_ids(input_ids)
        with self._grad_context():
            return self._step(input_ids, state)

    def _step(self, input_ids, state):
        h = self.embedding(input_ids).to(self.compute_dtype)
        residual = None
        with decode_step():  # (reference experts round as the fused step does: QuantExperts.int8_step_fc1)
            for block in self.blocks:
                residual, x = block.norm.add_forward(residual, h, self.compute_dtype)
                if block.is_mamba:
                    s = block.slot
                    h, conv, ssm = block.mixer.step(x, state.conv_state[s], state.ssm_state[s])
                    state.conv_state[s].copy_(conv)
                    state.ssm_state[s].copy_(ssm)
                else:
                    h = block.mixer(x)
        return self._logits(residual, h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.prefill(input_ids)[0]
