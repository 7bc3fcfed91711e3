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
atomics); the next kernel reads them directly. Weights are read in their stored formats (int8, int4, float).
The module parameters are captured by reference at construction: rebuild the step after changing weights.
Logits come back as float32 ``[B, V]``; the flat state tensors are updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qmamba.kernels._triton import jit, next_pow2, tl
from qmamba.kernels.causal_conv1d import causal_conv1d_update_triton
from qmamba.kernels.fused_moe import gated_act
from qmamba.kernels.quant_matmul import PackedWeight, dequant_matmul
from qmamba.kernels.selective_scan import _softplus


# ---- kernels ---------------------------------------------------------------------------------------------------------
@jit
def _add_norm_kernel(h_ptr, ids_ptr, emb_ptr, res_ptr, w_ptr, nb_ptr, out_ptr, rw_ptr, rb_ptr, idx_ptr, rwt_ptr,
                     D, E, eps, sh_b, s_emb, sr_b, so_b, srw_e,
                     FIRST: tl.constexpr, LAYERNORM: tl.constexpr, ROUTER: tl.constexpr, HAS_RB: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """residual = h (FIRST: embedding[ids]) [+ residual]; out = norm(residual); optional top-1 sigmoid router."""
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    if FIRST:
        tok = tl.load(ids_ptr + b).to(tl.int64)
        r = tl.load(emb_ptr + tok * s_emb + d, mask=dm, other=0.0).to(tl.float32)
    else:
        r = tl.load(res_ptr + b * sr_b + d, mask=dm, other=0.0) + tl.load(h_ptr + b * sh_b + d, mask=dm,
                                                                        other=0.0).to(tl.float32)
    tl.store(res_ptr + b * sr_b + d, r, mask=dm)
    if LAYERNORM:
        mean = tl.sum(r, axis=0) / D
        c = tl.where(dm, r - mean, 0.0)
        y = c * tl.rsqrt(tl.sum(c * c, axis=0) / D + eps)
    else:
        y = r * tl.rsqrt(tl.sum(r * r, axis=0) / D + eps)
    y = y * tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if LAYERNORM:
        y += tl.load(nb_ptr + d, mask=dm, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * so_b + d, y, mask=dm)
    if ROUTER:
        e = tl.arange(0, BLOCK_E)
        em = e < E
        wr = tl.load(rw_ptr + e[:, None] * srw_e + d[None, :], mask=em[:, None] & dm[None, :], other=0.0)
        logits = tl.sum(wr.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
        if HAS_RB:
            logits += tl.load(rb_ptr + e, mask=em, other=0.0).to(tl.float32)
        p = tl.where(em, tl.sigmoid(logits), -1.0)
        best = tl.max(p, axis=0)
        tl.store(idx_ptr + b, tl.min(tl.where(p == best, e, BLOCK_E), axis=0).to(tl.int32))
        tl.store(rwt_ptr + b, best)


@jit
def _dt_state_update_kernel(dbc_ptr, wdt_ptr, dtb_ptr, x_ptr, z_ptr, a_ptr, dskip_ptr, h_ptr, y_ptr,
                            DI, R, N, s_dbc, s_x, s_z, s_w, s_h, s_y,
                            BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dt = softplus(W_dt @ dbc[:R] + dt_bias); h = exp(dt A) h + dt x B (in place); y = (C.h + D x) silu(z)."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < DI
    r = tl.arange(0, BLOCK_R)
    low = tl.load(dbc_ptr + b * s_dbc + r, mask=r < R, other=0.0).to(tl.float32)
    w = tl.load(wdt_ptr + d[:, None] * s_w + r[None, :], mask=dm[:, None] & (r < R)[None, :], other=0.0)
    dt = tl.sum(w.to(tl.float32) * low[None, :], axis=1) + tl.load(dtb_ptr + d, mask=dm, other=0.0).to(tl.float32)
    dt = _softplus(dt)
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    bm = tl.load(dbc_ptr + b * s_dbc + R + n, mask=nm, other=0.0).to(tl.float32)
    cm = tl.load(dbc_ptr + b * s_dbc + R + N + n, mask=nm, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_x + d, mask=dm, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * s_z + d, mask=dm, other=0.0).to(tl.float32)
    mask = dm[:, None] & nm[None, :]
    a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=mask, other=0.0)
    hp = h_ptr + b * s_h + d[:, None] * N + n[None, :]
    h = tl.load(hp, mask=mask, other=0.0)
    h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * bm[None, :]
    tl.store(hp, h, mask=mask)
    y = tl.sum(h * cm[None, :], axis=1) + x * tl.load(dskip_ptr + d, mask=dm, other=0.0).to(tl.float32)
    y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * s_y + d, y.to(y_ptr.dtype.element_ty), mask=dm)


# ---- plan --------------------------------------------------------------------------------------------------------------
def linear_weight(module: nn.Module) -> tuple[PackedWeight, torch.Tensor | None]:
    """The kernel view of an ``nn.Linear`` or ``QuantLinear`` and its bias."""
    if isinstance(module, nn.Linear):
        return PackedWeight.from_float(module.weight.detach()), module.bias
    if hasattr(module, "fmt") and hasattr(module, "packed"):
        return PackedWeight.from_packed(module.fmt.name, module.packed(), module.out_features,
                                        module.in_features), module.bias
    raise TypeError(f"fused decode step: unsupported linear module {type(module).__name__}")


def dense_weight(module: nn.Module, dtype) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.dequantized_weight(dtype)


def expert_weight(experts: nn.Module, name: str) -> PackedWeight:
    w = getattr(experts, name)
    if isinstance(w, torch.Tensor):
        return PackedWeight.from_float(w.detach())
    return PackedWeight.from_packed(w.fmt.name, w.packed(), w.n, w.k)


@dataclass
class _MambaPlan:
    slot: int
    norm_w: torch.Tensor
    in_proj: PackedWeight
    in_bias: torch.Tensor | None
    conv_w: torch.Tensor
    conv_b: torch.Tensor | None
    x_proj: PackedWeight
    dt_w: torch.Tensor
    dt_bias: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor
    out_proj: PackedWeight
    out_bias: torch.Tensor | None


@dataclass
class _MoePlan:
    norm_w: torch.Tensor
    router_w: torch.Tensor
    router_b: torch.Tensor | None
    fc1: PackedWeight
    fc2: PackedWeight
    activation: str
    gated: bool


class FusedDecodeStep:
    """``step(token_ids [B], state) -> logits [B, V]`` fp32, state updated in place; see the module docstring."""

    def __init__(self, model: nn.Module):
        from qmamba.mamba_mixer import MambaMixer  # model imports stay out of the kernel package's import time
        from qmamba.moe import SwitchMoE

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
    def _add_norm(self, buf, h, ids, norm_w, first, router=None, norm_b=None):
        batch, d = buf["x"].shape
        rw, rb = router if router is not None else (None, None)
        e = rw.shape[0] if rw is not None else 1
        res = buf["residual"]
        _add_norm_kernel[(batch,)](
            h if h is not None else res, ids, self.embedding, res, norm_w, norm_b if norm_b is not None else norm_w,
            buf["x"], rw if rw is not None else norm_w, rb if rb is not None else norm_w, buf["idx"], buf["rwt"],
            d, e, self.eps, h.stride(0) if h is not None else 0, self.embedding.stride(0), res.stride(0),
            buf["x"].stride(0), rw.stride(0) if rw is not None else 0,
            FIRST=first, LAYERNORM=norm_b is not None, ROUTER=rw is not None, HAS_RB=rb is not None,
            BLOCK_D=next_pow2(d), BLOCK_E=next_pow2(e), num_warps=4 if res.is_cuda else 1)

    def __call__(self, token_ids: torch.Tensor, state) -> torch.Tensor:
        token_ids = token_ids.contiguous()  # the gather kernel reads ids[b] at offset b (a column slice is strided)
        batch = token_ids.shape[0]
        buf = self._workspace(batch, token_ids.device)
        buf["ws"].zero_()
        h = None
        for i, plan in enumerate(self.layers):
            views = buf["views"][i]
            if isinstance(plan, _MambaPlan):
                self._add_norm(buf, h, token_ids, plan.norm_w, first=i == 0)
                h = self._mamba(buf, plan, views, state)
            else:
                self._add_norm(buf, h, token_ids, plan.norm_w, first=i == 0, router=(plan.router_w, plan.router_b))
                h = self._moe(buf, plan, views)
        self._add_norm(buf, h, token_ids, self.final_w, first=False, norm_b=self.final_b)
        return dequant_matmul(buf["x"], self.head, self.head_bias, out=buf["logits"])

    def _mamba(self, buf, plan: _MambaPlan, views, state):
        xz, dbc, out = views
        batch = xz.shape[0]
        di = plan.in_proj.n // 2
        dequant_matmul(buf["x"], plan.in_proj, plan.in_bias, out=xz)
        conv = state.conv_state[plan.slot]
        xc = buf["xc"][:, :di]
        causal_conv1d_update_triton(xz[:, :di], conv, plan.conv_w, plan.conv_b, "silu", out_state=conv, out=xc)
        dequant_matmul(xc, plan.x_proj, None, out=dbc)
        ssm = state.ssm_state[plan.slot]
        y = buf["y"][:, :di]
        n = plan.A.shape[1]
        r = plan.dt_w.shape[1]
        block_d = 32 if xz.is_cuda else 16
        _dt_state_update_kernel[(batch, -(-di // block_d))](
            dbc, plan.dt_w, plan.dt_bias, xc, xz[:, di:], plan.A, plan.D, ssm, y, di, r, n,
            dbc.stride(0), xc.stride(0), xz.stride(0), plan.dt_w.stride(0), ssm.stride(0), y.stride(0),
            BLOCK_D=block_d, BLOCK_R=next_pow2(r), BLOCK_N=next_pow2(n), num_warps=4 if xz.is_cuda else 1)
        dequant_matmul(y, plan.out_proj, plan.out_bias, out=out)
        return out

    def _moe(self, buf, plan: _MoePlan, views):
        h1, out = views
        dequant_matmul(buf["x"], plan.fc1, row_expert=buf["idx"], out=h1)
        ffn = plan.fc1.n // 2 if plan.gated else plan.fc1.n
        act = buf["act"][:, :ffn]
        gated_act(h1, plan.activation, plan.gated, out=act)
        dequant_matmul(act, plan.fc2, row_expert=buf["idx"], row_scale=buf["rwt"], out=out)
        return out

