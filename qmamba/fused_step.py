"""One fused single-token step of a whole :class:`qmamba.model.MambaLM`, built for CUDA-graph capture.

:class:`FusedDecodeStep` walks the model's modules once (at construction) and then runs a step as a short, fixed
sequence of Triton launches with no allocation and no host synchronisation:

    per Mamba layer (5):  residual add + RMSNorm (embedding gather fused into the first layer's) -> in_proj ->
                          [conv step recomputed from the old conv state + x_proj] -> [conv state shift + dt_proj +
                          softplus + SSM state update (in place) + D skip + SiLU(z) gate] -> out_proj
    per MoE layer (3):    residual add + RMSNorm + router logits + sigmoid/argmax (one kernel) -> [fc1 of the chosen
                          expert (read by index), gate and up rows together, gated activation in the epilogue] ->
                          fc2 with the routing weight in the epilogue
    end (2):              residual add + final norm -> lm_head

The linear layers are :func:`qmamba.kernels.decode_linear.decode_linear` (whole rows per program, no split-K, no
workspace to zero); on Hopper every kernel is a programmatic dependent launch, so inside the CUDA graph each
kernel's weight loads overlap the previous kernel (:class:`DecodePolicy`, an explicit argument). Weights are read in
their stored formats (float, int8, int4); 1-bit weights and batches above ``MAX_ROWS`` take the general matmul
kernels (:func:`dequant_matmul`, :func:`binary_matmul`) with the conv step and the activation as their own launches.
The module parameters are captured by reference at construction: rebuild the step after changing weights.
Logits come back as float32 ``[B, V]``; the flat state tensors are updated in place.
The kernels themselves (tensors in, tensors out) live in :mod:`qmamba.kernels.decode_step` and beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qmamba.kernels.binary_matmul import BinaryWeight, binary_matmul
from qmamba.kernels.causal_conv1d import causal_conv1d_update_triton
from qmamba.kernels.decode_linear import MAX_ROWS, DecodePolicy, decode_linear
from qmamba.kernels.decode_step import add_norm, dt_state_update
from qmamba.kernels.fused_moe import gated_act
from qmamba.kernels.quant_matmul import PackedWeight, dequant_matmul
from qmamba.mamba_mixer import MambaMixer
from qmamba.moe import SwitchMoE


# ---- plan --------------------------------------------------------------------------------------------------------------
KernelWeight = PackedWeight | BinaryWeight


def _kernel_weight(fmt, packed: dict, n: int, k: int) -> KernelWeight:
    if fmt.name == "binary":
        return BinaryWeight.from_packed(packed, n, k)
    return PackedWeight.from_packed(fmt.name, packed, n, k)


def linear_weight(module: nn.Module) -> tuple[KernelWeight, torch.Tensor | None]:
    """The kernel view of an ``nn.Linear``, ``QuantLinear`` or ``BinaryLinear`` and its bias."""
    if isinstance(module, nn.Linear):
        return PackedWeight.from_float(module.weight.detach()), module.bias
    if hasattr(module, "fmt") and hasattr(module, "packed"):
        return _kernel_weight(module.fmt, module.packed(), module.out_features, module.in_features), module.bias
    raise TypeError(f"fused decode step: unsupported linear module {type(module).__name__}")


def dense_weight(module: nn.Module, dtype) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.dequantized_weight(dtype)


def expert_weight(experts: nn.Module, name: str) -> KernelWeight:
    w = getattr(experts, name)
    if isinstance(w, torch.Tensor):
        return PackedWeight.from_float(w.detach())
    return _kernel_weight(w.fmt, w.packed(), w.n, w.k)


def matmul(x: torch.Tensor, weight: KernelWeight, bias=None, row_expert=None, row_scale=None, out=None):
    """``x @ W^T`` with the general kernel for the weight's format (any M; ``out`` float32 and zeroed under
    split-K, or None for a new tensor)."""
    if isinstance(weight, BinaryWeight):
        return binary_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, out=out)
    return dequant_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, out=out)


def fused_linear(x, weight: KernelWeight, out, policy: DecodePolicy, *, bias=None, row_expert=None, row_scale=None,
                 conv=None, gated: str | None = None):
    """``out <- f(x) @ W^T`` with the prologue / epilogue fusions of :func:`decode_linear` (conv step in front,
    gated activation after); for weights or batch sizes that kernel does not take, the same result from the general
    kernels plus separate conv / activation launches."""
    if isinstance(weight, PackedWeight) and x.shape[0] <= MAX_ROWS:
        return decode_linear(x, weight, out, bias=bias, row_expert=row_expert, row_scale=row_scale, conv=conv,
                             gated=gated, policy=policy)
    if conv is not None:  # the conv step's output, the state left as it is (the dt kernel shifts it)
        state, conv_w, conv_b = conv
        x, _ = causal_conv1d_update_triton(x, state, conv_w, conv_b, "silu", out_state=torch.empty_like(state))
    y = matmul(x, weight, bias, row_expert=row_expert, row_scale=None if gated else row_scale)
    if gated:
        y = gated_act(y, gated, True)
        if row_scale is not None:
            y = y * row_scale[:, None]
    out.copy_(y)
    return out


@dataclass
class _MambaPlan:
    slot: int
    norm_w: torch.Tensor
    in_proj: KernelWeight
    in_bias: torch.Tensor | None
    conv_w: torch.Tensor
    conv_b: torch.Tensor | None
    x_proj: KernelWeight
    dt_w: torch.Tensor
    dt_bias: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor
    out_proj: KernelWeight
    out_bias: torch.Tensor | None


@dataclass
class _MoePlan:
    norm_w: torch.Tensor
    router_w: torch.Tensor
    router_b: torch.Tensor | None
    fc1: KernelWeight
    fc2: KernelWeight
    activation: str
    gated: bool


class FusedDecodeStep:
    """``step(token_ids [B], state) -> logits [B, V]`` fp32, state updated in place; see the module docstring."""

    def __init__(self, model: nn.Module, policy: DecodePolicy | None = None):
        cfg = model.config
        self.model = model
        self.policy = policy or DecodePolicy.for_device(model.device)
        self.dtype = model.compute_dtype
        self.d_model, self.vocab = cfg.d_model, cfg.vocab_size
        self.eps = float(cfg.norm_eps)
        self.embedding = model.embedding.weight.detach()
        self.layers = []
        for i, block in enumerate(model.layers):
            mixer = block.mixer
            if isinstance(mixer, MambaMixer):
                in_w, in_b = linear_weight(mixer.in_proj)
                x_w, _ = linear_weight(mixer.x_proj)
                out_w, out_b = linear_weight(mixer.out_proj)
                self.layers.append(_MambaPlan(
                    model._state_slot[i], block.norm.weight.detach(), in_w, in_b,
                    mixer.conv_weight.detach().contiguous(),
                    None if mixer.conv_bias is None else mixer.conv_bias.detach(), x_w,
                    dense_weight(mixer.dt_proj, self.dtype).contiguous(), mixer.dt_bias.detach(),
                    (-torch.exp(mixer.A_log.detach().float())).contiguous(), mixer.D.detach(), out_w, out_b))
            elif isinstance(mixer, SwitchMoE):
                router = mixer.router
                self.layers.append(_MoePlan(
                    block.norm.weight.detach(), dense_weight(router, self.dtype).contiguous(),
                    None if router.bias is None else router.bias.detach(), expert_weight(mixer.experts, "fc1"),
                    expert_weight(mixer.experts, "fc2"), mixer.experts.activation, mixer.experts.gated))
            else:
                raise TypeError(f"fused decode step: unsupported mixer {type(mixer).__name__} in layer {i}")
        norm_f = model.norm_f
        self.final_w = norm_f.weight.detach()
        self.final_b = getattr(norm_f, "bias", None)  # LayerNorm has a bias, RMSNorm none
        self.head, self.head_bias = linear_weight(model.lm_head)
        self._buffers: dict[int, dict] = {}

    # ---- buffers -------------------------------------------------------------------------------------------------
    def _workspace(self, batch: int, device) -> dict:
        """Per-batch-size activation buffers (float32; written before they are read, never zeroed)."""
        if batch in self._buffers:
            return self._buffers[batch]
        mamba = [p for p in self.layers if isinstance(p, _MambaPlan)]
        moe = [p for p in self.layers if isinstance(p, _MoePlan)]
        widths = dict(xz=max((p.in_proj.n for p in mamba), default=1), dbc=max((p.x_proj.n for p in mamba), default=1),
                      y=max((p.in_proj.n // 2 for p in mamba), default=1),
                      act=max((p.fc1.n // (2 if p.gated else 1) for p in moe), default=1),
                      h=self.d_model, x=self.d_model, residual=self.d_model, logits=self.head.n)
        buf = {name: torch.empty(batch, w, device=device, dtype=torch.float32) for name, w in widths.items()}
        buf["idx"] = torch.empty(batch, device=device, dtype=torch.int32)
        buf["rwt"] = torch.empty(batch, device=device, dtype=torch.float32)
        self._buffers[batch] = buf
        return buf

    # ---- one step --------------------------------------------------------------------------------------------------
    def _add_norm(self, buf, h, ids, norm_w, router=None, norm_b=None):
        rw, rb = router if router is not None else (None, None)
        add_norm(buf["x"], buf["residual"], norm_w, self.eps, h=h, token_ids=ids, embedding=self.embedding,
                 norm_b=norm_b, router_w=rw, router_b=rb, expert_idx=buf["idx"], expert_weight=buf["rwt"],
                 pdl=self.policy.pdl)

    def __call__(self, token_ids: torch.Tensor, state) -> torch.Tensor:
        token_ids = token_ids.contiguous()  # the gather kernel reads ids[b] at offset b (a column slice is strided)
        batch = token_ids.shape[0]
        buf = self._workspace(batch, token_ids.device)
        h = None
        for plan in self.layers:
            if isinstance(plan, _MambaPlan):
                self._add_norm(buf, h, token_ids, plan.norm_w)
                h = self._mamba(buf, plan, state)
            else:
                self._add_norm(buf, h, token_ids, plan.norm_w, router=(plan.router_w, plan.router_b))
                h = self._moe(buf, plan)
        self._add_norm(buf, h, token_ids, self.final_w, norm_b=self.final_b)
        return fused_linear(buf["x"], self.head, buf["logits"], self.policy, bias=self.head_bias)

    def _mamba(self, buf, plan: _MambaPlan, state):
        di = plan.in_proj.n // 2
        xz = buf["xz"][:, :2 * di]
        fused_linear(buf["x"], plan.in_proj, xz, self.policy, bias=plan.in_bias)
        conv = (state.conv_state[plan.slot], plan.conv_w, plan.conv_b)
        dbc = buf["dbc"][:, :plan.x_proj.n]
        fused_linear(xz[:, :di], plan.x_proj, dbc, self.policy, conv=conv)
        y = buf["y"][:, :di]
        dt_state_update(dbc, plan.dt_w, plan.dt_bias, xz[:, :di], xz[:, di:], plan.A, plan.D,
                        state.ssm_state[plan.slot], y, conv=conv, pdl=self.policy.pdl)
        return fused_linear(y, plan.out_proj, buf["h"], self.policy, bias=plan.out_bias)

    def _moe(self, buf, plan: _MoePlan):
        ffn = plan.fc1.n // 2 if plan.gated else plan.fc1.n
        act = buf["act"][:, :ffn]
        if plan.gated:
            fused_linear(buf["x"], plan.fc1, act, self.policy, row_expert=buf["idx"], gated=plan.activation)
        else:
            fused_linear(buf["x"], plan.fc1, act, self.policy, row_expert=buf["idx"])
            act.copy_(gated_act(act, plan.activation, False))
        return fused_linear(act, plan.fc2, buf["h"], self.policy, row_expert=buf["idx"], row_scale=buf["rwt"])
