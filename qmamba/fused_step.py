"""One fused single-token step of a whole :class:`qmamba.model.MambaLM`, built for CUDA-graph capture.

:class:`FusedDecodeStep` walks the model's modules once (at construction) and then runs a step as a short, fixed
sequence of Triton launches with no allocation and no host synchronisation:

    per Mamba layer (6):  residual add + RMSNorm (embedding gather fused into the first layer's) -> in_proj ->
                          conv step (state in place) -> x_proj -> [dt_proj + softplus + SSM state update (in place)
                          + D skip + SiLU(z) gate, one kernel] -> out_proj
    per MoE layer (4):    residual add + RMSNorm + router logits + sigmoid/argmax (one kernel) -> fc1 of the chosen
                          expert (read by index) -> gated activation -> fc2 with the routing weight in the epilogue
    end (2):              residual add + final norm -> lm_head

Matmul outputs land in one float32 workspace that is zeroed once per step (split-K kernels accumulate into it with
atomics); the next kernel reads them directly. Weights are read in their stored formats (int8, int4, 1-bit binary,
float): each matmul goes to :func:`dequant_matmul` or, for a binary weight, :func:`binary_matmul`.
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
    """``x @ W^T`` into ``out`` with the kernel for the weight's format."""
    if isinstance(weight, BinaryWeight):
        return binary_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, out=out)
    return dequant_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, out=out)


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

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.model = model
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
                    model._state_slot[i], block.norm.weight.detach(), in_w, in_b, mixer.conv_weight.detach(),
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
        """Per-batch-size buffers: one zeroed-per-step fp32 workspace sliced per layer, plus activations."""
        if batch in self._buffers:
            return self._buffers[batch]
        sizes = []
        for plan in self.layers:
            if isinstance(plan, _MambaPlan):
                sizes.append((plan.in_proj.n, plan.x_proj.n, plan.out_proj.n))
            else:
                sizes.append((plan.fc1.n, plan.fc2.n))
        total = sum(sum(s) for s in sizes) + self.head.n
        ws = torch.zeros(total * batch, device=device, dtype=torch.float32)
        views, off = [], 0
        for s in sizes:
            layer = []
            for n in s:
                layer.append(ws[off:off + n * batch].view(batch, n))
                off += n * batch
            views.append(layer)
        logits = ws[off:off + self.head.n * batch].view(batch, self.head.n)
        d, dt = self.d_model, self.dtype
        di = max((p.in_proj.n // 2 for p in self.layers if isinstance(p, _MambaPlan)), default=1)
        ffn = max((p.fc1.n // (2 if p.gated else 1) for p in self.layers if isinstance(p, _MoePlan)), default=1)
        buf = dict(ws=ws, views=views, logits=logits,
                   residual=torch.empty(batch, d, device=device, dtype=torch.float32),
                   x=torch.empty(batch, d, device=device, dtype=dt),
                   xc=torch.empty(batch, di, device=device, dtype=dt), y=torch.empty(batch, di, device=device, dtype=dt),
                   act=torch.empty(batch, ffn, device=device, dtype=dt),
                   idx=torch.empty(batch, device=device, dtype=torch.int32),
                   rwt=torch.empty(batch, device=device, dtype=torch.float32))
        self._buffers[batch] = buf
        return buf

    # ---- one step --------------------------------------------------------------------------------------------------
    def _add_norm(self, buf, h, ids, norm_w, router=None, norm_b=None):
        rw, rb = router if router is not None else (None, None)
        add_norm(buf["x"], buf["residual"], norm_w, self.eps, h=h, token_ids=ids, embedding=self.embedding,
                 norm_b=norm_b, router_w=rw, router_b=rb, expert_idx=buf["idx"], expert_weight=buf["rwt"])

    def __call__(self, token_ids: torch.Tensor, state) -> torch.Tensor:
        token_ids = token_ids.contiguous()  # the gather kernel reads ids[b] at offset b (a column slice is strided)
        batch = token_ids.shape[0]
        buf = self._workspace(batch, token_ids.device)
        buf["ws"].zero_()
        h = None
        for i, plan in enumerate(self.layers):
            views = buf["views"][i]
            if isinstance(plan, _MambaPlan):
                self._add_norm(buf, h, token_ids, plan.norm_w)
                h = self._mamba(buf, plan, views, state)
            else:
                self._add_norm(buf, h, token_ids, plan.norm_w, router=(plan.router_w, plan.router_b))
                h = self._moe(buf, plan, views)
        self._add_norm(buf, h, token_ids, self.final_w, norm_b=self.final_b)
        return matmul(buf["x"], self.head, self.head_bias, out=buf["logits"])

    def _mamba(self, buf, plan: _MambaPlan, views, state):
        xz, dbc, out = views
        di = plan.in_proj.n // 2
        matmul(buf["x"], plan.in_proj, plan.in_bias, out=xz)
        conv = state.conv_state[plan.slot]
        xc = buf["xc"][:, :di]
        causal_conv1d_update_triton(xz[:, :di], conv, plan.conv_w, plan.conv_b, "silu", out_state=conv, out=xc)
        matmul(xc, plan.x_proj, None, out=dbc)
        ssm = state.ssm_state[plan.slot]
        y = buf["y"][:, :di]
        dt_state_update(dbc, plan.dt_w, plan.dt_bias, xc, xz[:, di:], plan.A, plan.D, ssm, y)
        matmul(y, plan.out_proj, plan.out_bias, out=out)
        return out

    def _moe(self, buf, plan: _MoePlan, views):
        h1, out = views
        matmul(buf["x"], plan.fc1, row_expert=buf["idx"], out=h1)
        ffn = plan.fc1.n // 2 if plan.gated else plan.fc1.n
        act = buf["act"][:, :ffn]
        gated_act(h1, plan.activation, plan.gated, out=act)
        matmul(act, plan.fc2, row_expert=buf["idx"], row_scale=buf["rwt"], out=out)
        return out

