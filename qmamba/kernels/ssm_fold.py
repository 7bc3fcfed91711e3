"""The SSM update with out_proj folded in (one row, the fused decode step): one kernel where there were two.

A program owns a block of input channels of out_proj. It runs the SSM update of those channels (as
:func:`qmamba.kernels.decode_step.dt_state_update`: conv step, dt, state in place, ``y``), then adds its share
``W_out[:, block] @ y[block]`` of out_proj's output into the step's fp32 buffers by relaxed atomic adds (split-K over
the channels: no program needs another's ``y``, so the out_proj launch and its wait go). The next layer's add + norm is
linear up to its ``1 / rms``, so the same adds build it:

* ``pending [D]`` += the share (the residual stream's new term; the residual itself is only read here, and the
  consumer after the next adds ``pending`` in, :class:`qmamba.kernels.decode_linear.NormOut`);
* ``u [D]`` += share * ``norm_w`` (the next norm's input ``(residual + pending) * norm_w``; ``u`` starts at zero);
* ``acc[1 + e]`` += ``R[e, block] @ y[block]`` with ``R = router_w diag(norm_w) W_out`` (:func:`router_fold`, the
  router's sums of ``u`` through out_proj, computed once).

Program ``c`` also adds the old residual's part of ``u`` and of the router sums (and out_proj's bias), over its slice
``c`` of the D outputs (after a fold just before this one, Mamba after Mamba, it first adds that fold's pending term
into its slice of the residual: ``SsmFold.pending_prev``). The consumer (fc1 of an MoE layer, or in_proj of a Mamba
layer: :class:`qmamba.kernels.decode_linear.NormIn` with its ``residual``) reads ``u`` as its input (raw planes),
computes the sum of squares of ``residual + pending`` itself and, fc1, routes. The layer walk is
:class:`qmamba.fused_step.FusedDecodeStep`'s (``DecodePolicy.ssm_fold``).

Weights: float out_proj is read as stored (``[D, DI]``, a ``[D, BLOCK_D]`` block a program); int4 is read as column
words (:func:`qmamba.quant.layout.int4_to_columns`, built once by :func:`out_columns`), codes masked in place as
subnormal floats against the input scaled per nibble position (as the plane-word decode kernels).
Twin: :func:`ssm_update_fold_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.kernels._triton import jit, next_pow2, tl
from qmamba.kernels.decode_linear import _subnormal_codes, check_fp32_pair
from qmamba.kernels.decode_step import _ssm_step, _ssm_weights, dt_state_update_ref
from qmamba.kernels.input_planes import x_plane_scale
from qmamba.kernels.weights import FMT_FLOAT, FMT_INT4, FMT_INT4_PLANES, PackedWeight
from qmamba.quant.layout import INT4_TILE, INT4_TILE_WORDS, int4_from_planes, int4_to_columns, unpack_int4

FOLD_FLOAT, FOLD_INT4 = 0, 1  # the kernel's compile-time format switch
assert (INT4_TILE, INT4_TILE_WORDS) == (128, 16)  # the kernel's column words spell them out


@dataclass
class OutColumns:
    """out_proj as the fold kernel reads it: ``fmt`` FOLD_FLOAT (``w`` the stored ``[D, DI]``) or FOLD_INT4
    (``w`` column words ``[DI, ceil(D / 128) * 16]`` int32, ``scale`` / ``zero`` ``[n_blocks, D]`` fp32 transposed from
    the stored ones, groups of ``group_size`` along DI)."""

    fmt: int
    n: int
    k: int
    w: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int = 0


def out_columns(weight: PackedWeight) -> OutColumns | None:
    """The fold kernel's view of a one-matrix weight (float: the same tensor; int4 words or plane words: a new
    column-word tensor, ~the codes' bytes), or None where it has none (int8, 1-bit, stacks)."""
    if not isinstance(weight, PackedWeight) or weight.n_experts != 1:
        return None
    if weight.fmt == FMT_FLOAT:
        return OutColumns(FOLD_FLOAT, weight.n, weight.k, weight.qweight[0])
    if weight.fmt not in (FMT_INT4, FMT_INT4_PLANES) or weight.group_size % 16:
        return None
    q = weight.qweight[0]
    nb = weight.scales.shape[-1]
    if weight.fmt == FMT_INT4_PLANES:
        q = int4_from_planes(q, nb, weight.group_size)
    codes, zeros = unpack_int4(q, weight.zeros[0], weight.k)
    return OutColumns(FOLD_INT4, weight.n, weight.k, int4_to_columns(codes), weight.scales[0].float().t().contiguous(),
                      zeros.float().t().contiguous(), weight.group_size)


def router_fold(router_w: torch.Tensor, norm_w: torch.Tensor, out_proj: PackedWeight) -> torch.Tensor:
    """``R = router_w diag(norm_w) W_out`` ``[E, DI]`` fp32: the router's sums of the next norm's input through
    out_proj (the dequantized weight the kernels multiply; none is made for a router of no experts, a Mamba layer
    next)."""
    if router_w.shape[0] == 0:
        return router_w.new_zeros(0, out_proj.k, dtype=torch.float32)
    w_out = out_proj.dequantized(torch.float32)[0]
    return ((router_w.float() * norm_w.float()[None, :]) @ w_out).contiguous()


@dataclass(frozen=True)
class SsmFold:
    """What the folded out_proj adds into (see the module docstring): ``out`` (:class:`OutColumns`), its ``bias``,
    the next norm's weight ``norm_w [D]``, the next router ``router_w [E, D]`` and ``router_fold [E, DI]``
    (:func:`router_fold`), the step's fp32 buffers ``residual [1, D]`` (read), ``pending [1, D]``, ``u [1, D]``
    (both added to) and the next layer's sums row ``acc [1 + E]`` (its router sums added to; ``E`` may be 0: a
    Mamba layer next). ``pending_prev`` / ``u_prev``: the fold before this one (Mamba after Mamba) left its pending
    term for this one to add into the residual: program ``c`` adds its slice of it (so the residual it reads is the
    whole one) and zeroes that slice of both, for the fold after next."""

    out: OutColumns
    bias: torch.Tensor | None
    norm_w: torch.Tensor
    router_w: torch.Tensor
    router_fold: torch.Tensor
    residual: torch.Tensor
    pending: torch.Tensor
    u: torch.Tensor
    acc: torch.Tensor
    pending_prev: torch.Tensor | None = None  # a previous fold's pending term (and its u, ``[1, >= D]``), not yet
    u_prev: torch.Tensor | None = None        # in the residual: each program adds its slice in and zeroes both


# ---- kernel --------------------------------------------------------------------------------------------------------
@jit
def _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, i: tl.constexpr):
    """Outputs ``n`` of nibble ``i`` of the column words ``o`` (layout.int4_to_columns), their mask, and their
    scale, zero point (group ``g``) and next-norm weight, fp32 (constants: loaded before the wait)."""
    n = (o // 16) * 128 + 16 * i + (o % 16)
    nm = n < D
    s = tl.load(os_ptr + g * s_os + n, mask=nm, other=0.0)
    z = tl.load(oz_ptr + g * s_os + n, mask=nm, other=0.0)
    return n, nm, s, z, tl.load(nw_ptr + n, mask=nm, other=0.0).to(tl.float32)


@jit
def _nibble_out(wo, hi, yb, ysum, n, nm, s, z, nw, pend_ptr, u_ptr, i: tl.constexpr):
    """Nibble ``i``'s outputs of this block's share, added into ``pending`` and (times the norm weight) ``u``: the
    code masked in place as a subnormal, ``code * 2^(4p - 149)``, times ``y * 2^(96 - 4p)`` is ``code * y * 2^-53``,
    summed over the block's channels (``yb``: y broadcast to the words' tile once, its layout converted once)."""
    acc = tl.sum(_subnormal_codes(wo, hi, i) * (yb * x_plane_scale(i)), axis=1)
    part = s * (acc * (2.0 ** 53) - z * ysum)
    tl.atomic_add(pend_ptr + n, part, mask=nm, sem="relaxed")
    tl.atomic_add(u_ptr + n, part * nw, mask=nm, sem="relaxed")


@jit
def _ssm_fold_kernel(dbc_ptr, wdt_ptr, dtb_ptr, x_ptr, z_ptr, a_ptr, dskip_ptr, h_ptr, cs_ptr, cw_ptr, cb_ptr, yty_ptr,
                     ow_ptr, os_ptr, oz_ptr, ob_ptr, nw_ptr, rf_ptr, rw_ptr, res_ptr, pend_ptr, u_ptr, acc_ptr,
                     pprev_ptr, uprev_ptr,
                     DI, R, N, D, E, GS, s_dbc, s_x, s_z, s_w, s_h, scs_b, scs_d, s_ow, s_os, s_rf, s_rw,
                     FMT: tl.constexpr, CONV: tl.constexpr, CONV_W: tl.constexpr, HAS_CB: tl.constexpr,
                     HAS_OB: tl.constexpr, PREV: tl.constexpr, PDL: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """Program ``c``: channels ``[c BLOCK_D, (c + 1) BLOCK_D)`` of the SSM and of out_proj's K, and outputs
    ``[c BLOCK_S, (c + 1) BLOCK_S)`` for the old residual's part. ``BLOCK_O``: float, D padded; int4, the column
    words of a row padded. Weights, norm and router vectors before the wait (PDL)."""
    c = tl.program_id(0)
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < DI
    w, dtb, a, dskip, cw, cb = _ssm_weights(wdt_ptr, dtb_ptr, a_ptr, dskip_ptr, cw_ptr, cb_ptr, d, dm, R, N, s_w, CONV,
                                            CONV_W, HAS_CB, BLOCK_R, BLOCK_N, BLOCK_W)
    o = tl.arange(0, BLOCK_O)
    if FMT == 0:  # float: the [D, BLOCK_D] block of the stored [D, DI]
        om = o < D
        wo = tl.load(ow_ptr + o[:, None] * s_ow + d[None, :], mask=om[:, None] & dm[None, :], other=0.0)
        nwo = tl.load(nw_ptr + o, mask=om, other=0.0).to(tl.float32)
    else:  # int4: the block's column words as [words, BLOCK_D] (the words contiguous along axis 0)
        n_words = (D + 127) // 128 * 16  # layout.INT4_TILE elements in INT4_TILE_WORDS words (checked below)
        wo = tl.load(ow_ptr + d[None, :] * s_ow + o[:, None], mask=(o < n_words)[:, None] & dm[None, :], other=0)
        g = (c * BLOCK_D) // GS  # the block's quantization group (BLOCK_D divides the group size)
        n0, m0, s0, z0, w0 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 0)
        n1, m1, s1, z1, w1 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 1)
        n2, m2, s2, z2, w2 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 2)
        n3, m3, s3, z3, w3 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 3)
        n4, m4, s4, z4, w4 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 4)
        n5, m5, s5, z5, w5 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 5)
        n6, m6, s6, z6, w6 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 6)
        n7, m7, s7, z7, w7 = _nibble_consts(os_ptr, oz_ptr, nw_ptr, g, s_os, o, D, 7)
    e = tl.arange(0, BLOCK_E)
    em = e < E
    rf = tl.load(rf_ptr + e[:, None] * s_rf + d[None, :], mask=em[:, None] & dm[None, :], other=0.0)
    sl = c * BLOCK_S + tl.arange(0, BLOCK_S)
    slm = sl < D
    nws = tl.load(nw_ptr + sl, mask=slm, other=0.0).to(tl.float32)
    rws = tl.load(rw_ptr + e[:, None] * s_rw + sl[None, :], mask=em[:, None] & slm[None, :], other=0.0).to(tl.float32)
    obs = tl.zeros((BLOCK_S,), dtype=tl.float32)
    if HAS_OB:
        obs = tl.load(ob_ptr + sl, mask=slm, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    res = tl.load(res_ptr + sl, mask=slm, other=0.0)
    if PREV:  # the previous fold's pending term into the residual (this slice only: no other program reads it)
        res += tl.load(pprev_ptr + sl, mask=slm, other=0.0)
        tl.store(res_ptr + sl, res, mask=slm)
        tl.store(pprev_ptr + sl, tl.zeros_like(res), mask=slm)
        tl.store(uprev_ptr + sl, tl.zeros_like(res), mask=slm)
    y = _ssm_step(0, d, dm, dbc_ptr, x_ptr, z_ptr, h_ptr, cs_ptr, w, dtb, a, dskip, cw, cb, R, N, s_dbc, s_x, s_z, s_h,
                  scs_b, scs_d, CONV, CONV_W, HAS_CB, BLOCK_R, BLOCK_N, BLOCK_W)
    yq = tl.where(dm, y.to(yty_ptr.dtype.element_ty).to(tl.float32), 0.0)  # y as out_proj would read it
    # the old residual's (and the bias's) part of u and of the router sums, over this program's slice of outputs
    us = (res + obs) * nws
    tl.atomic_add(u_ptr + sl, us, mask=slm, sem="relaxed")
    if HAS_OB:
        tl.atomic_add(pend_ptr + sl, obs, mask=slm, sem="relaxed")
    sums = tl.sum(rws * us[None, :], axis=1) + tl.sum(rf * yq[None, :], axis=1)
    tl.atomic_add(acc_ptr + 1 + e, sums, mask=em, sem="relaxed")
    # this block's share of out_proj
    if FMT == 0:
        part = tl.sum(wo.to(tl.float32) * yq[None, :], axis=1)
        tl.atomic_add(pend_ptr + o, part, mask=om, sem="relaxed")
        tl.atomic_add(u_ptr + o, part * nwo, mask=om, sem="relaxed")
    else:
        ysum = tl.sum(yq, axis=0)
        hi = wo >> 20
        yq = yq[None, :] + tl.zeros(wo.shape, dtype=tl.float32)
        _nibble_out(wo, hi, yq, ysum, n0, m0, s0, z0, w0, pend_ptr, u_ptr, 0)
        _nibble_out(wo, hi, yq, ysum, n1, m1, s1, z1, w1, pend_ptr, u_ptr, 1)
        _nibble_out(wo, hi, yq, ysum, n2, m2, s2, z2, w2, pend_ptr, u_ptr, 2)
        _nibble_out(wo, hi, yq, ysum, n3, m3, s3, z3, w3, pend_ptr, u_ptr, 3)
        _nibble_out(wo, hi, yq, ysum, n4, m4, s4, z4, w4, pend_ptr, u_ptr, 4)
        _nibble_out(wo, hi, yq, ysum, n5, m5, s5, z5, w5, pend_ptr, u_ptr, 5)
        _nibble_out(wo, hi, yq, ysum, n6, m6, s6, z6, w6, pend_ptr, u_ptr, 6)
        _nibble_out(wo, hi, yq, ysum, n7, m7, s7, z7, w7, pend_ptr, u_ptr, 7)


# ---- launcher and reference twin -----------------------------------------------------------------------------------
def fold_block_d(out: OutColumns, block_d: int) -> int:
    """Channels a program: ``block_d`` (a power of two), at most the int4 group size (a block is one group)."""
    if block_d & (block_d - 1) or block_d < 1:
        raise ValueError(f"ssm_update_fold: block_d must be a power of two, got {block_d}")
    return min(block_d, out.group_size) if out.fmt == FOLD_INT4 else block_d


def ssm_update_fold(dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, y_like, fold: SsmFold, conv=None,
                    pdl: bool = False, block_d: int = 32, num_warps: int = 4):
    """One row: the SSM update of :func:`qmamba.kernels.decode_step.dt_state_update` (same arguments; ``y`` rounded
    to the dtype of the tensor ``y_like``, as out_proj would read it, and not stored) with out_proj folded in: ``fold.pending``, ``fold.u``
    and ``fold.acc`` receive the adds of the module docstring. Twin: :func:`ssm_update_fold_ref`."""
    batch, di = x.shape
    r, n = dt_w.shape[1], A.shape[1]
    out = fold.out
    d = out.n
    if batch != 1:
        raise ValueError("ssm_update_fold: one row")
    if tuple(ssm_state.shape) != (1, di, n) or ssm_state.stride(-1) != 1 or ssm_state.stride(-2) != n:
        raise ValueError(f"ssm_update_fold: ssm_state must be a row-contiguous [1, {di}, {n}] tensor")
    if out.k != di or not A.is_contiguous():
        raise ValueError(f"ssm_update_fold: out_proj must have K = {di} and A must be contiguous")
    for name, t in (("residual", fold.residual), ("pending", fold.pending), ("u", fold.u)):
        if tuple(t.shape) != (1, d) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"ssm_update_fold: {name} must be a contiguous float32 [1, {d}]")
    e = fold.router_w.shape[0]
    if tuple(fold.router_fold.shape) != (e, di) or fold.acc.numel() < 1 + e or fold.router_w.stride(1) != 1:
        raise ValueError("ssm_update_fold: router_fold must be [E, DI] beside router_w [E, D] and acc [1 + E]")
    check_fp32_pair("ssm_update_fold", "pending_prev / u_prev", fold.pending_prev, fold.u_prev, d)
    prev = fold.pending_prev is not None
    cs, cw, cb = conv if conv is not None else (ssm_state, dt_w, None)
    bd = fold_block_d(out, block_d)
    programs = -(-di // bd)
    block_o = next_pow2(d) if out.fmt == FOLD_FLOAT else next_pow2(-(-d // INT4_TILE) * INT4_TILE_WORDS)
    dummy = fold.pending
    _ssm_fold_kernel[(programs,)](
        dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, cs, cw, cb if cb is not None else dt_bias,
        y_like, out.w,
        out.scale if out.scale is not None else dummy, out.zero if out.zero is not None else dummy,
        fold.bias if fold.bias is not None else dummy, fold.norm_w, fold.router_fold, fold.router_w, fold.residual,
        fold.pending, fold.u, fold.acc, fold.pending_prev if prev else dummy, fold.u_prev if prev else dummy,
        di, r, n, d, e, max(out.group_size, 1), dbc.stride(0), x.stride(0),
        z.stride(0), dt_w.stride(0), ssm_state.stride(0), cs.stride(0), cs.stride(1), out.w.stride(0),
        out.scale.stride(0) if out.scale is not None else 0, fold.router_fold.stride(0), fold.router_w.stride(0),
        FMT=out.fmt, CONV=conv is not None, CONV_W=cw.shape[1] if conv is not None else 1, HAS_CB=cb is not None,
        HAS_OB=fold.bias is not None, PREV=prev, PDL=pdl, BLOCK_D=bd, BLOCK_R=next_pow2(r), BLOCK_N=next_pow2(n),
        BLOCK_W=next_pow2(cw.shape[1]) if conv is not None else 1, BLOCK_O=block_o, BLOCK_E=next_pow2(e),
        BLOCK_S=next_pow2(-(-d // programs)), num_warps=num_warps if x.is_cuda else 1,
        **(dict(launch_pdl=True) if pdl else {}))


def ssm_update_fold_ref(dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, y_dtype, fold: SsmFold, w_out: torch.Tensor,
                        conv=None):
    """Functional twin of :func:`ssm_update_fold` (``w_out [D, DI]``: out_proj dense): ``(new ssm state, new conv
    state | None, pending, u, acc, residual)`` as the kernel leaves them (fp32; nothing is modified; with
    ``pending_prev`` the kernel also zeroes it and ``u_prev``)."""
    got = dt_state_update_ref(dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, conv=conv)
    y, h = got[0], got[1]
    yq = y.to(y_dtype).float()
    share = yq @ w_out.float().t()
    bias = fold.bias.float() if fold.bias is not None else torch.zeros_like(share[0])
    nw = fold.norm_w.float()
    residual = fold.residual.float()
    if fold.pending_prev is not None:
        residual = residual + fold.pending_prev.float()
    u_old = (residual + bias) * nw
    pending = fold.pending.float() + share + bias
    u = fold.u.float() + u_old + share * nw
    acc = fold.acc.float().clone()
    e = fold.router_w.shape[0]
    acc[1:1 + e] += fold.router_w.float() @ u_old[0] + fold.router_fold.float() @ yq[0]
    return h, (got[2] if conv is not None else None), pending, u, acc, residual
