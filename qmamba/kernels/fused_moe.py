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
Where a prefill's fc1 takes the W4A8 path (int4 plane words times int8 activations, ``MatmulPolicy.w4a8_min_m``)
and ``MatmulPolicy.w4a8_route_quantizes`` is on (off by default: measured level, session 43), the routing kernel
also quantizes x per row (:func:`route_top1_int8`: the codes, scales and tile sums of
:func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8`, bit for bit, from the row it reads for the logits; the
routing bit for bit :func:`route_top1`'s), and fc1's W4A8 GEMM takes them (``x_int8`` of :func:`dequant_matmul`)
instead of a quantizer launch of its own; fc2's input ``a`` is quantized by its matmul.
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
from qmamba.kernels.w4a8_gemm import (check_int8_k_pad, int8_codes, int8_row_scale, plane_byte_inputs,
                                      sum_columns)
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
def _route_top1_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, wt_ptr, q_ptr, s_ptr, sum_ptr, K, E, sxm, sxk, swe, swk, sqm,
                       ssum, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                       QUANT: tl.constexpr, K_PAD: tl.constexpr, SUMS: tl.constexpr, BLOCK_Q: tl.constexpr,
                       CUDA: tl.constexpr):
    """One program a row: the router's logits, sigmoid, first argmax. ``QUANT``: also the row quantized to int8 as
    :func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8` writes it (``K_PAD`` code columns in plane-byte order, the
    scale, ``SUMS`` tile-sum columns), in passes after the logits' loop, which is the same as without it (the
    routing stays bit for bit the plain kernel's); the row is read again from the cache."""
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
    if QUANT:
        row64 = row.to(tl.int64)
        x_row = x_ptr + row64 * sxm
        amax = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # the row's largest magnitude (exact in any order)
        for k0 in range(0, K, BLOCK_Q):
            k = k0 + tl.arange(0, BLOCK_Q)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + k * sxk, mask=k < K, other=0.0).to(tl.float32)))
        scale, inv = int8_row_scale(tl.max(amax, axis=0))
        tl.store(s_ptr + row64, scale)
        for j0 in range(0, K_PAD, BLOCK_Q):  # output columns in plane-byte order, whole 128-column tiles
            j = j0 + tl.arange(0, BLOCK_Q)
            k = plane_byte_inputs(j)
            q = int8_codes(tl.load(x_row + k * sxk, mask=k < K, other=0.0).to(tl.float32), inv, CUDA)
            tl.store(q_ptr + row64 * sqm + j, q.to(tl.int8), mask=j < K_PAD)
            t = j0 // 128 + tl.arange(0, BLOCK_Q // 128)
            tl.store(sum_ptr + row64 * ssum + t, tl.sum(tl.reshape(q, (BLOCK_Q // 128, 128)), axis=1),
                     mask=t < K_PAD // 128)  # (sums of integers below 2^24: exact in any order)
        t = tl.arange(0, SUMS)
        tl.store(sum_ptr + row64 * ssum + t, tl.zeros((SUMS,), dtype=tl.float32), mask=t >= K_PAD // 128)


def route_meta(k: int, e: int, has_bias: bool, k_pad: int | None, cuda: bool) -> dict:
    """The routing kernel's compile-time arguments and warps for ``x [T, k]``, ``e`` experts (``k_pad``: the int8
    rows too) on CUDA or the interpreter. The routing's (``BLOCK_K``, ``BLOCK_E``, warps) do not depend on
    ``k_pad``: with and without the quantization the logits are the same computation, bit for bit."""
    quant = k_pad is not None
    return dict(HAS_BIAS=has_bias, BLOCK_E=next_pow2(e), BLOCK_K=min(next_pow2(k), 512 if cuda else 64),
                QUANT=quant, K_PAD=k_pad if quant else 0, SUMS=sum_columns(k_pad) if quant else 0,
                BLOCK_Q=min(next_pow2(k_pad), 512 if cuda else 128) if quant else 128, CUDA=cuda and quant,
                num_warps=4 if cuda else 1)


def _route(x, router_w, router_b, k_pad: int | None):
    t, k = x.shape
    e = router_w.shape[0]
    idx = torch.empty(t, device=x.device, dtype=torch.int32)
    weight = torch.empty(t, device=x.device, dtype=torch.float32)
    codes = scale = sums = idx  # (not read without k_pad)
    if k_pad is not None:
        codes = torch.empty(t, k_pad, dtype=torch.int8, device=x.device)
        scale = torch.empty(t, dtype=torch.float32, device=x.device)
        sums = torch.empty(t, sum_columns(k_pad), dtype=torch.float32, device=x.device)  # padding: the kernel's zeros
    if t:
        _route_top1_kernel[(t,)](x, router_w, router_b if router_b is not None else router_w, idx, weight, codes,
                                 scale, sums, k, e, *x.stride(), *router_w.stride(), codes.stride(0), sums.stride(0),
                                 **route_meta(k, e, router_b is not None, k_pad, x.is_cuda))
    return (idx, weight, (codes, scale, sums)) if k_pad is not None else (idx, weight)


def route_top1(x, router_w, router_b=None):
    """Triton twin of :func:`route_top1_ref`."""
    return _route(x, router_w, router_b, None)


def route_top1_int8(x, router_w, router_b, k_pad: int):
    """:func:`route_top1` and :func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8` ``(x, k_pad)`` in one launch (one
    program a row, three passes over its row: the logits, the largest magnitude, the codes; the results bit for bit
    theirs, on CUDA too): ``(idx, weight, (codes, scale, sums))``, the last the W4A8 GEMM's int8 input (``x_int8`` of
    :func:`dequant_matmul`). H100, session 43: 17.9 us a launch at 2,048 x 1,472 bf16, against 11.7 for the routing
    alone and ~5 for the quantizer's launch (``MatmulPolicy.w4a8_route_quantizes``, off)."""
    check_int8_k_pad("route_top1_int8", x, k_pad)
    return _route(x, router_w, router_b, k_pad)


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
                  pdl: bool = False, early_tile: bool = False, x_int8=None):
    """``x @ W^T`` (optional ``bias``, routing ``row_expert`` / gate ``row_scale`` / expert ``tiles``, ``out``) on
    the general kernel of the record's type: :func:`binary_matmul` for a :class:`BinaryWeight`, else
    :func:`dequant_matmul` (same arguments; ``pdl``: their small-M kernels as programmatic dependent launches;
    ``early_tile``: the first weight tile of int4 plane words read before the wait, ``x_int8``: x already quantized
    for the W4A8 path, :func:`dequant_matmul` only)."""
    if isinstance(weight, BinaryWeight):
        if x_int8 is not None:
            raise ValueError("routed matmul: x_int8 is for the W4A8 path of int4 plane words, not a 1-bit weight")
        return binary_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, tiles=tiles, out=out,
                             pdl=pdl)
    return dequant_matmul(x, weight, bias, row_expert=row_expert, row_scale=row_scale, tiles=tiles, out=out, pdl=pdl,
                          early_tile=early_tile, x_int8=x_int8)


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
    ``block_m``: rows per expert tile in prefill (default: :func:`_tile_rows`). A prefill whose fc1 takes the W4A8
    path (``MatmulPolicy.takes_w4a8``) can route and quantize x in one launch (:func:`route_top1_int8`,
    ``MatmulPolicy.w4a8_route_quantizes``) and hand the codes to fc1's W4A8 GEMM; fc2's input is quantized by the
    matmul, as any."""
    if fc1.n_experts != router_w.shape[0] or fc2.n_experts != fc1.n_experts:
        raise ValueError(f"MoE: router has {router_w.shape[0]} experts, fc1 {fc1.n_experts}, fc2 {fc2.n_experts}")
    t = x.shape[0]
    policy = current_policy()
    x_int8 = None
    # fc1 (routed, no config or out) takes dequant_matmul's W4A8 path: its input quantized by the routing kernel
    if t > GEMV_MAX_M and policy.w4a8_route_quantizes and policy.takes_w4a8(t, fc1):
        idx, weight, x_int8 = route_top1_int8(x, router_w, router_b, fc1.qweight.shape[-1] * 8)
    else:
        idx, weight = route_top1(x, router_w, router_b)
    tiles = None
    if t > GEMV_MAX_M:
        tiles = expert_tile_map(idx, fc1.n_experts, block_m or _tile_rows(t, fc1, x.device))
    if (tiles is not None and gated and isinstance(fc1, PackedWeight) and policy.gemm_gated_act
            and t < policy.dequant_experts_min_m):
        a = dequant_matmul(x, fc1, row_expert=idx, tiles=tiles, gate=activation,  # the activation in the epilogue
                           x_int8=x_int8)
    else:
        a = gated_act(routed_matmul(x, fc1, row_expert=idx, tiles=tiles, x_int8=x_int8), activation, gated)
    return routed_matmul(a, fc2, row_expert=idx, row_scale=weight, tiles=tiles)
