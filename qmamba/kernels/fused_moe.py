"""BlackMamba's top-1 Switch-MoE on the GPU without a host synchronisation, and its pure-PyTorch twin.

    idx, weight = route_top1(x, router_w, router_b)        # one kernel: logits, sigmoid, argmax, p[argmax]
    h   = fc1(x) by expert                                  # routed matmul
    a   = act(h[:, :F]) * h[:, F:]   (gated) | act(h)       # one elementwise kernel (or fc1's epilogue:
                                                            #   MatmulPolicy.gemm_gated_act, prefill)
    out = weight * fc2(a) by expert                         # routed matmul, routing weight in the epilogue

Decode (T <= 16 tokens): the routed matmuls launch one program column per expert and each reads only its own
tokens' rows (idle experts loop zero times), so the chosen experts' weights are read by index on the device and
the step is graph-capturable. Prefill: tokens are sorted by expert into row tiles (:func:`expert_tile_map`) and
the same kernels run as a grouped GEMM. fc1 and fc2 are kernel records, each a :class:`PackedWeight` stack (int8,
int4 or float ``[E, N, K]``: :func:`dequant_matmul`) or a :class:`BinaryWeight` stack (1 bit:
:func:`binary_matmul`); :func:`routed_matmul` picks the kernel by the record's type, so 1-bit, mixed and
int4/int8/float experts share one forward.
Shapes: ``x [T, d]``, ``router_w [E, d]``, ``router_b [E]``, ``fc1 [E, F or 2F, d]``, ``fc2 [E, d, F]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.kernels._triton import jit, next_pow2, pdl_launch, tl
from qmamba.kernels.activations import ACTIVATION_IDS, activate
from qmamba.kernels.binary_matmul import binary_matmul, binary_matmul_ref
from qmamba.kernels.matmul_configs import GEMV_MAX_M, current_policy, pick_config
from qmamba.kernels.quant_matmul import dequant_matmul, dequant_matmul_ref
from qmamba.kernels.routing import expert_tile_map
from qmamba.kernels.weights import BinaryWeight, PackedWeight

KernelWeight = PackedWeight | BinaryWeight


# ---- references ----------------------------------------------------------------------------------------------------
def route_top1_ref(x, router_w, router_b=None):
    """``(expert_idx [T] int32, weight [T] fp32)``: sigmoid of the fp32 router logits, first maximum wins."""
    logits = x.float() @ router_w.float().t()
    if router_b is not None:
        logits = logits + router_b.float()
    weight, idx = torch.sigmoid(logits).max(dim=-1)
    return idx.to(torch.int32), weight


def gated_act_ref(h, activation: str, gated: bool):
    hf = h.float()
    act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
           "relu": F.relu}[activation]
    if gated:
        a, b = hf.chunk(2, dim=-1)
        return (act(a) * b).to(h.dtype)
    return act(hf).to(h.dtype)


def routed_matmul_ref(x, weight: KernelWeight, bias=None, row_expert=None, row_scale=None):
    """Twin of :func:`routed_matmul`."""
    ref = binary_matmul_ref if isinstance(weight, BinaryWeight) else dequant_matmul_ref
    return ref(x, weight, bias, row_expert=row_expert, row_scale=row_scale)


def moe_forward_ref(x, router_w, router_b, fc1: KernelWeight, fc2: KernelWeight, activation: str, gated: bool):
    idx, weight = route_top1_ref(x, router_w, router_b)
    h = routed_matmul_ref(x, fc1, row_expert=idx)
    return routed_matmul_ref(gated_act_ref(h, activation, gated), fc2, row_expert=idx, row_scale=weight)


# ---- Triton ----------------------------------------------------------------------------------------------------------
@jit
def _route_top1_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, wt_ptr, K, E, sxm, sxk, swe, swk,
                       HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xv = tl.load(x_ptr + row * sxm + k * sxk, mask=k_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * swe + k[None, :] * swk, mask=e_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(wv * xv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    p = tl.where(e_ok, tl.sigmoid(acc), -1.0)
    best = tl.max(p, axis=0)
    first = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)  # first maximum, as torch.max
    tl.store(idx_ptr + row, first.to(tl.int32))
    tl.store(wt_ptr + row, best)


def route_top1(x, router_w, router_b=None):
    """Triton twin of :func:`route_top1_ref`."""
    t, k = x.shape
    e = router_w.shape[0]
    idx = torch.empty(t, device=x.device, dtype=torch.int32)
    weight = torch.empty(t, device=x.device, dtype=torch.float32)
    if t:
        _route_top1_kernel[(t,)](x, router_w, router_b if router_b is not None else router_w, idx, weight, k, e,
                                 *x.stride(), *router_w.stride(), HAS_BIAS=router_b is not None,
                                 BLOCK_E=next_pow2(e), BLOCK_K=min(next_pow2(k), 512 if x.is_cuda else 64),
                                 num_warps=4 if x.is_cuda else 1)
    return idx, weight


@jit
def _gated_act_kernel(h_ptr, out_ptr, F_OUT, shm, shf, som, sof,
                      ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # a programmatic dependent launch: h comes from the kernel before
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F_OUT
    a = activate(tl.load(h_ptr + row * shm + f * shf, mask=ok, other=0.0).to(tl.float32), ACT)
    if GATED:
        a = a * tl.load(h_ptr + row * shm + (f + F_OUT) * shf, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * som + f * sof, a.to(out_ptr.dtype.element_ty), mask=ok)


def gated_act(h, activation: str, gated: bool, out=None, pdl: bool = False):
    """Triton twin of :func:`gated_act_ref`: ``h [T, 2F or F]`` -> ``[T, F]`` (into ``out`` when given; ``pdl``: as
    a programmatic dependent launch, Hopper and newer)."""
    t, width = h.shape
    f_out = width // 2 if gated else width
    out = torch.empty(t, f_out, device=h.device, dtype=h.dtype) if out is None else out
    if t:
        block = min(next_pow2(f_out), 1024 if h.is_cuda else 64)
        _gated_act_kernel[(t, -(-f_out // block))](h, out, f_out, *h.stride(), *out.stride(),
                                                   ACT=ACTIVATION_IDS[activation], GATED=gated, BLOCK=block,
                                                   PDL=pdl, num_warps=4 if h.is_cuda else 1,
                                                   **pdl_launch(pdl))
    return out


def routed_matmul(x, weight: KernelWeight, bias=None, row_expert=None, row_scale=None, tiles=None, out=None,
                  pdl: bool = False, early_tile: bool = False):
    """``x @ W^T`` (optional ``bias``, routing ``row_expert`` / gate ``row_scale`` / expert ``tiles``, ``out``) on
    the general kernel of the record's type: :func:`binary_matmul` for a :class:`BinaryWeight`, else
    :func:`dequant_matmul` (same arguments; ``pdl``: their small-M kernels as programmatic dependent launches;
    ``early_tile``: the first weight tile of int4 plane words read before the wait, :func:`dequant_matmul` only)."""
    if isinstance(weight, BinaryWeight):
        return binary_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, tiles=tiles, out=out,
                             pdl=pdl)
    return dequant_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, tiles=tiles, out=out, pdl=pdl,
                          early_tile=early_tile)


def _tile_rows(t: int, fc1: KernelWeight, device) -> int:
    """Rows per expert tile of a prefill of ``t`` tokens: the general matmul's config for an int8/int4/float fc1
    (fc2 runs on the same tiles); 64 on CUDA (32 elsewhere) for 1-bit."""
    if isinstance(fc1, BinaryWeight):
        return 32 if device.type != "cuda" else 64
    policy = current_policy()
    if policy.takes_w4a8(t, fc1):  # fc2 too: the policy's W4A8 tile
        return policy.w4a8_tile[0]
    return pick_config(t, fc1, device, policy=policy).block_m


def moe_forward(x, router_w, router_b, fc1: KernelWeight, fc2: KernelWeight, activation: str, gated: bool,
                block_m: int | None = None):
    """Triton twin of :func:`moe_forward_ref`: ``x [T, d]`` -> ``[T, d]`` in x.dtype, no host synchronisation.
    ``block_m``: rows per expert tile in prefill (default: :func:`_tile_rows`)."""
    if fc1.n_experts != router_w.shape[0] or fc2.n_experts != fc1.n_experts:
        raise ValueError(f"MoE: router has {router_w.shape[0]} experts, fc1 {fc1.n_experts}, fc2 {fc2.n_experts}")
    idx, weight = route_top1(x, router_w, router_b)
    t = x.shape[0]
    tiles = None
    if t > GEMV_MAX_M:
        tiles = expert_tile_map(idx, fc1.n_experts, block_m or _tile_rows(t, fc1, x.device))
    policy = current_policy()
    if (tiles is not None and gated and isinstance(fc1, PackedWeight) and policy.gemm_gated_act
            and t < policy.dequant_experts_min_m):
        a = dequant_matmul(x, fc1, row_expert=idx, tiles=tiles, gate=activation)  # the activation in the epilogue
    else:
        a = gated_act(routed_matmul(x, fc1, row_expert=idx, tiles=tiles), activation, gated)
    return routed_matmul(a, fc2, row_expert=idx, row_scale=weight, tiles=tiles)
