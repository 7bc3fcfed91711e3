"""Tensor-level Triton kernels of the fused single-token decode step, each beside its pure-PyTorch twin.

* :func:`add_norm` (twin :func:`add_norm_ref`): ``residual = h + residual`` (or the embedding row of a token for
  the first layer), ``x = RMSNorm|LayerNorm(residual)``, and optionally the top-1 sigmoid router on ``x``, the int4
  input planes of ``x`` and ``x`` quantized to int8 per row for the W4A8 row programs.
* :func:`dt_state_update` (twin :func:`dt_state_update_ref`): ``dt = softplus(W_dt @ dbc[:, :R] + dt_bias)``, the
  SSM state update in place, the ``C`` readout, the ``D`` skip and the ``SiLU(z)`` gate; optionally the conv step
  (its output recomputed, the conv state shifted in place).

Both take ``pdl`` (programmatic dependent launch on CUDA: weights are read before waiting for the previous kernel).

Shapes: ``B`` rows (batch), ``d`` model width, ``DI`` inner width, ``R`` dt rank, ``N`` state size, ``E`` experts.
The model-walking part (which weights feed which kernel) is :mod:`qmamba.fused_step`; this module knows tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.kernels._triton import cdiv, jit, next_pow2, pdl_launch, tl
from qmamba.kernels.input_planes import add_word_sums, store_x_planes
from qmamba.kernels.row_norm import normed, row_stats
from qmamba.kernels.selective_scan import _softplus
from qmamba.kernels.w4a8_gemm import check_int8_operands, int8_codes, int8_row_scale, plane_byte_columns
from qmamba.quant.layout import check_word_sums, check_x_planes


# ---- kernels ---------------------------------------------------------------------------------------------------------
@jit
def _store_planes(xpl_row, cols, y, KPAD: tl.constexpr):
    """The int4 input planes of the stored values ``y`` at ``cols`` (whole 128-column tiles, starting at a tile):
    planes 0..7, the tiles' word sums in plane 8 and plane 8's zero tail at these columns (0 past the row's end)."""
    yf = y.to(tl.float32)
    pm = cols < KPAD
    store_x_planes(xpl_row, cols, yf, pm, KPAD)
    n: tl.constexpr = y.shape[0]
    word = tl.sum(tl.reshape(yf, (n // 128, 8, 16)), axis=1) * (2.0 ** -53)                          # [tiles, 16]
    q = ((tl.min(cols, axis=0) // 128 + tl.arange(0, n // 128)) * 16)[:, None] + tl.arange(0, 16)[None, :]
    tl.store(xpl_row + 8 * KPAD + q, word, mask=q < KPAD // 8)
    tl.store(xpl_row + 8 * KPAD + cols, tl.zeros_like(yf), mask=(cols >= KPAD // 8) & pm)  # the rest: 0


@jit
def _store_int8_row(yf, d, q_row, s_ptr, sum_row, QPAD: tl.constexpr, CUDA: tl.constexpr):
    """The fp32 row ``yf`` (columns ``d``, 0 past its end; a multiple of 128 long, at least ``QPAD``) quantized to
    int8 as :func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8` quantizes it: the codes stored in plane-byte order
    (each input at its column, :func:`qmamba.kernels.w4a8_gemm.plane_byte_columns`), the scale, and each 128-column
    tile's code sum."""
    scale, inv = int8_row_scale(tl.max(tl.abs(yf), axis=0))
    q = int8_codes(yf, inv, CUDA)
    tl.store(q_row + plane_byte_columns(d), q.to(tl.int8), mask=d < QPAD)
    tl.store(s_ptr, scale)
    n: tl.constexpr = yf.shape[0]
    t = tl.arange(0, n // 128)
    tl.store(sum_row + t, tl.sum(tl.reshape(q, (n // 128, 128)), axis=1), mask=t < QPAD // 128)


@jit
def _add_norm_kernel(h_ptr, ids_ptr, emb_ptr, rin_ptr, res_ptr, w_ptr, nb_ptr, out_ptr, rw_ptr, rb_ptr, idx_ptr,
                     rwt_ptr, xpl_ptr, zero_ptr, xq_ptr, xs_ptr, xsum_ptr, n_zero, D, E, eps, sh_b, s_emb, sri_b,
                     sr_b, so_b, srw_e, sxpl_b, sxq_b, sxsum_b,
                     ZERO_BLOCK: tl.constexpr, FIRST: tl.constexpr, HAS_RES: tl.constexpr,
                     LAYERNORM: tl.constexpr, ROUTER: tl.constexpr, HAS_RB: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_E: tl.constexpr, PDL: tl.constexpr, X_PLANES: tl.constexpr, KPAD: tl.constexpr,
                     SLICE: tl.constexpr, X_INT8: tl.constexpr = False, QPAD: tl.constexpr = 128,
                     CUDA: tl.constexpr = False):
    """residual = h (FIRST: embedding[ids]) [+ residual in, HAS_RES]; out = norm(residual); optional top-1 sigmoid
    router. The residual is read from ``rin`` and written to ``res`` (the same buffer in the decode step unless
    the planes are split, below). Every load is issued before the first reduction, so their latencies overlap (one
    round trip, not three); with ``PDL`` the weights (norm, router) are read before waiting for the previous
    kernel. ``X_PLANES``: also the int4 input planes of the stored ``out`` (:data:`qmamba.quant.layout.INT4_X_PLANES`,
    ``KPAD`` columns a plane). ``X_INT8``: also the stored ``out`` quantized to int8 per row (``QPAD`` code columns,
    :func:`_store_int8_row`), the input of the W4A8 row programs.
    ``SLICE < KPAD`` (split planes; ``rin`` and ``res`` must then be different buffers): program ``(b, p)`` computes
    the row's mean / rstd from the whole row (a few KB from L2), then only the planes of columns ``[p SLICE, (p + 1)
    SLICE)`` (whole plane tiles), from those columns read again; program 0 also writes the residual, ``out`` and the
    routing. One program a row (``SLICE = KPAD``) computes and stores all 9 x KPAD plane values itself; spread over
    programs, that work runs side by side (H200, session 21: 4 programs a row, int4 decode ~1% faster).
    ``ZERO_BLOCK > 0``: the programs also zero ``n_zero`` floats at ``zero_ptr`` (after the wait), blocks of
    ``ZERO_BLOCK`` in turn (a buffer of one block: program (0, 0) alone)."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    SPLIT: tl.constexpr = X_PLANES and SLICE < KPAD
    nw = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    nb = nw
    if LAYERNORM:
        nb = tl.load(nb_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if ROUTER:
        e = tl.arange(0, BLOCK_E)
        em = e < E
        wr = tl.load(rw_ptr + e[:, None] * srw_e + d[None, :], mask=em[:, None] & dm[None, :], other=0.0)
        rbias = tl.zeros((BLOCK_E,), dtype=tl.float32)
        if HAS_RB:
            rbias = tl.load(rb_ptr + e, mask=em, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if ZERO_BLOCK > 0:
        programs = tl.num_programs(0) * tl.num_programs(1)
        for z0 in range((b * tl.num_programs(1) + part) * ZERO_BLOCK, n_zero, programs * ZERO_BLOCK):
            z = z0 + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + z, tl.zeros((ZERO_BLOCK,), dtype=tl.float32), mask=z < n_zero)
    tok = 0
    if FIRST:
        tok = tl.load(ids_ptr + b).to(tl.int64)
        r = tl.load(emb_ptr + tok * s_emb + d, mask=dm, other=0.0).to(tl.float32)
    else:
        r = tl.load(h_ptr + b * sh_b + d, mask=dm, other=0.0).to(tl.float32)
        if HAS_RES:
            r += tl.load(rin_ptr + b * sri_b + d, mask=dm, other=0.0)
    mean, rstd = row_stats(r, dm, D, eps, LAYERNORM)
    if part == 0:
        tl.store(res_ptr + b * sr_b + d, r, mask=dm)
        y = normed(r, dm, mean, rstd, nw, nb, LAYERNORM, out_ty)
        tl.store(out_ptr + b * so_b + d, y, mask=dm)
        if X_PLANES and not SPLIT:
            _store_planes(xpl_ptr + b * sxpl_b, d, y, KPAD)
        if X_INT8:
            _store_int8_row(y.to(tl.float32), d, xq_ptr + b * sxq_b, xs_ptr + b, xsum_ptr + b * sxsum_b, QPAD, CUDA)
        if ROUTER:
            logits = tl.sum(wr.to(tl.float32) * y.to(tl.float32)[None, :], axis=1) + rbias
            p = tl.where(em, tl.sigmoid(logits), -1.0)
            best = tl.max(p, axis=0)
            tl.store(idx_ptr + b, tl.min(tl.where(p == best, e, BLOCK_E), axis=0).to(tl.int32))
            tl.store(rwt_ptr + b, best)
    if SPLIT:
        # this program's columns, read again (rin is not the buffer written above), normed as above
        ds = part * SLICE + tl.arange(0, SLICE)
        dsm = ds < D
        if FIRST:
            rs = tl.load(emb_ptr + tok * s_emb + ds, mask=dsm, other=0.0).to(tl.float32)
        else:
            rs = tl.load(h_ptr + b * sh_b + ds, mask=dsm, other=0.0).to(tl.float32)
            if HAS_RES:
                rs += tl.load(rin_ptr + b * sri_b + ds, mask=dsm, other=0.0)
        nws = tl.load(w_ptr + ds, mask=dsm, other=0.0).to(tl.float32)
        nbs = nws
        if LAYERNORM:
            nbs = tl.load(nb_ptr + ds, mask=dsm, other=0.0).to(tl.float32)
        ys = tl.where(dsm, normed(rs, dsm, mean, rstd, nws, nbs, LAYERNORM, out_ty), 0.0)
        _store_planes(xpl_ptr + b * sxpl_b, ds, ys, KPAD)


@jit
def _ssm_inputs(x_ptr, z_ptr, h_ptr, cs_ptr, b, d, dm, n, mask, t, tm, s_x, s_z, s_h, scs_b, scs_d, N,
                CONV: tl.constexpr, CONV_W: tl.constexpr):
    """The SSM update's inputs of this program's channels: ``(x, z, h, h's pointers, the conv window's old state
    [BLOCK_D, BLOCK_W] or 0, its pointers)``; ``t`` / ``tm``: the window's positions and their mask."""
    x = tl.load(x_ptr + b * s_x + d, mask=dm, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * s_z + d, mask=dm, other=0.0).to(tl.float32)
    hp = h_ptr + b * s_h + d[:, None] * N + n[None, :]
    h = tl.load(hp, mask=mask, other=0.0)
    old = 0.0
    sp = cs_ptr
    if CONV:
        # window = [state[1:], x]: element t of the new window is state[t + 1] (t < W - 1) or x
        sp = cs_ptr + b * scs_b + d[:, None] * scs_d + t[None, :]
        old = tl.load(sp + 1, mask=tm & (t < CONV_W - 1)[None, :], other=0.0)
    return x, z, h, hp, old, sp


@jit
def _dt_state_update_kernel(dbc_ptr, wdt_ptr, dtb_ptr, x_ptr, z_ptr, a_ptr, dskip_ptr, h_ptr, y_ptr,
                            cs_ptr, cw_ptr, cb_ptr, ypl_ptr, DI, R, N, s_dbc, s_x, s_z, s_w, s_h, s_y, scs_b, scs_d,
                            s_ypl, CONV: tl.constexpr, CONV_W: tl.constexpr, HAS_CB: tl.constexpr, PDL: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_W: tl.constexpr, Y_PLANES: tl.constexpr, YPL_K: tl.constexpr, yws_ptr, s_yws,
                            Y_WSUMS: tl.constexpr, EARLY: tl.constexpr):
    """dt = softplus(W_dt @ dbc[:R] + dt_bias); h = exp(dt A) h + dt x B (in place); y = (C.h + D x) silu(z).
    ``CONV``: ``x`` is the conv step's input; the kernel computes ``silu(conv(window) + b)`` itself and writes the
    shifted window back to the conv state (every other reader of the old state ran before this kernel).
    All loads first (their latencies overlap), then the arithmetic; with ``PDL`` the weights come before the wait,
    and with ``EARLY`` also x, z and the states (written two launches or more before this one: see
    :func:`dt_state_update`), so that only ``dbc`` is read after it."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < DI
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    mask = dm[:, None] & nm[None, :]
    w = tl.load(wdt_ptr + d[:, None] * s_w + r[None, :], mask=dm[:, None] & (r < R)[None, :], other=0.0)
    dtb = tl.load(dtb_ptr + d, mask=dm, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=mask, other=0.0)
    dskip = tl.load(dskip_ptr + d, mask=dm, other=0.0).to(tl.float32)
    t = tl.arange(0, BLOCK_W)  # the conv window's positions (BLOCK_W 1 without CONV)
    tm = dm[:, None] & (t < CONV_W)[None, :]
    if CONV:
        cw = tl.load(cw_ptr + d[:, None] * CONV_W + t[None, :], mask=tm, other=0.0).to(tl.float32)
        if HAS_CB:
            cb = tl.load(cb_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if EARLY:
        x, z, h, hp, old, sp = _ssm_inputs(x_ptr, z_ptr, h_ptr, cs_ptr, b, d, dm, n, mask, t, tm, s_x, s_z, s_h, scs_b,
                                           scs_d, N, CONV, CONV_W)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    low = tl.load(dbc_ptr + b * s_dbc + r, mask=r < R, other=0.0).to(tl.float32)
    bm = tl.load(dbc_ptr + b * s_dbc + R + n, mask=nm, other=0.0).to(tl.float32)
    cm = tl.load(dbc_ptr + b * s_dbc + R + N + n, mask=nm, other=0.0).to(tl.float32)
    if not EARLY:
        x, z, h, hp, old, sp = _ssm_inputs(x_ptr, z_ptr, h_ptr, cs_ptr, b, d, dm, n, mask, t, tm, s_x, s_z, s_h, scs_b,
                                           scs_d, N, CONV, CONV_W)
    # The states are updated in place, and a tile smaller than the program's threads (the conv window [BLOCK_D, W]
    # always below 32 channels; h where BLOCK_D * BLOCK_N < 128) is held by several threads: every thread's loads
    # must precede any thread's stores (without this, 8 channels a program at batch 8 gave wrong tokens on the H200)
    tl.debug_barrier()
    if CONV:
        window = tl.where((t == CONV_W - 1)[None, :], x.to(old.dtype)[:, None], old)
        tl.store(sp, window, mask=tm)
        xc = tl.sum(window.to(tl.float32) * cw, axis=1)
        if HAS_CB:
            xc += cb
        x = xc * tl.sigmoid(xc)
    dt = _softplus(tl.sum(w.to(tl.float32) * low[None, :], axis=1) + dtb)
    h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * bm[None, :]
    tl.store(hp, h, mask=mask)
    y = tl.sum(h * cm[None, :], axis=1) + x * dskip
    y = y * z * tl.sigmoid(z)
    yq = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + b * s_y + d, yq, mask=dm)
    if Y_PLANES:  # planes 0..7 of the int4 input planes of y as stored (out_proj's input)
        store_x_planes(ypl_ptr + b * s_ypl, d, yq.to(tl.float32), dm, YPL_K)
    if Y_WSUMS:  # and their word sums, added into a row of their own (zeroed by the caller)
        add_word_sums(yws_ptr + b * s_yws, d, yq.to(tl.float32), dm)


# ---- launchers and reference twins -------------------------------------------------------------------------------
def add_norm(x_out, residual, norm_w, eps, h=None, token_ids=None, embedding=None, norm_b=None, router_w=None,
             router_b=None, expert_idx=None, expert_weight=None, pdl: bool = False, x_planes=None,
             plane_programs: int = 1, residual_out=None, zero=None, x_int8=None):
    """In place: ``residual [B, d]`` fp32 becomes ``h + residual`` (``h [B, d]``), or ``embedding[token_ids]`` when
    ``h`` is None (the first layer); with ``residual_out`` (another ``[B, d]`` fp32 buffer) that one receives it and
    ``residual`` is only read; ``x_out [B, d]`` receives the norm of it (LayerNorm when ``norm_b`` is given,
    else RMSNorm). With ``router_w [E, d]``: ``expert_idx [B]`` int32 and ``expert_weight [B]`` fp32 receive the
    top-1 sigmoid routing of ``x_out`` (lowest index on ties). ``pdl``: launched as a programmatic dependent
    launch (CUDA, see :mod:`qmamba.kernels.decode_linear`). ``x_planes [B, 9, k_pad]`` fp32 (row-contiguous
    planes): also receives the int4 input planes of ``x_out`` as stored (:func:`qmamba.quant.layout.int4_x_planes`),
    the input the plane-word decode kernels read with ``DecodePolicy.int4_x_planes``. ``plane_programs``: programs
    a row that share the writing of its planes (at most one per 128-column plane tile; each computes the whole norm,
    see ``_add_norm_kernel``; ``DecodePolicy.norm_plane_programs``). Every program reads the residual and the first
    writes the new one, so a residual added in place (no ``residual_out``) keeps one program a row. ``zero``: a
    contiguous float32 tensor zeroed by the same launch (the fused step's norm sums,
    :class:`qmamba.kernels.decode_linear.NormOut`, and with ``DecodePolicy.producer_word_sums`` the word-sum rows),
    by the programs in turn, blocks of up to 1,024 elements. ``x_int8 = (codes, scale, sums)``: buffers of
    :func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8`'s shapes (``sums`` zeroed once: its padding columns are not
    written) that receive what it computes from the stored ``x_out``, the input of
    :func:`qmamba.kernels.w4a8_rows.w4a8_rows`."""
    if zero is not None and (zero.dtype != torch.float32 or not zero.is_contiguous()):
        raise ValueError("add_norm: zero must be a contiguous float32 tensor")
    if h is None and (token_ids is None or embedding is None):
        raise ValueError("add_norm: the first layer needs token_ids and the embedding")
    if residual_out is None:
        residual_out = residual
        if h is not None:
            plane_programs = 1
    elif residual_out.shape != residual.shape or residual_out.data_ptr() == residual.data_ptr():
        # (the split planes read the residual twice: it must not be the buffer written)
        raise ValueError("add_norm: residual_out must be another buffer of the residual's shape")
    if x_int8 is not None:
        check_int8_operands("add_norm", x_int8, x_out.shape[0], x_out.shape[1])
    _launch_add_norm(x_out, residual, residual_out, norm_w, eps, h, token_ids, embedding, norm_b, router_w,
                     router_b, expert_idx, expert_weight, pdl, x_planes, plane_programs, zero, x_int8)


def _launch_add_norm(x_out, residual_in, residual_out, norm_w, eps, h, token_ids, embedding, norm_b, router_w,
                     router_b, expert_idx, expert_weight, pdl: bool, x_planes=None, plane_programs: int = 1,
                     zero=None, x_int8=None):
    """``_add_norm_kernel`` over the rows of ``x_out``: the residual read from ``residual_in`` (None: none added)
    and written to ``residual_out``; with ``x_planes``, ``plane_programs`` programs a row (rounded down to a power
    of two that divides the planes' tiles)."""
    batch, d = x_out.shape
    e = router_w.shape[0] if router_w is not None else 1
    dummy = norm_w
    rin = residual_in if residual_in is not None else residual_out
    block_d = next_pow2(d)
    kpad, parts = 1, 1
    if x_planes is not None:
        kpad = check_x_planes("add_norm", "x_planes", x_planes, batch, d)
        block_d = max(block_d, kpad)
        parts = max(1, min(int(plane_programs), kpad // 128))
        parts = 1 << (parts.bit_length() - 1)  # kpad // 128 is a power of two: parts divides it
    codes, qscale, qsums = x_int8 if x_int8 is not None else (residual_out,) * 3
    qpad = codes.shape[1] if x_int8 is not None else 128
    if x_int8 is not None:
        block_d = max(block_d, qpad)
    _add_norm_kernel[(batch, parts)](
        h if h is not None else residual_out, token_ids if token_ids is not None else residual_out,
        embedding if embedding is not None else dummy, rin, residual_out, norm_w,
        norm_b if norm_b is not None else dummy, x_out, router_w if router_w is not None else dummy,
        router_b if router_b is not None else dummy, expert_idx if expert_idx is not None else residual_out,
        expert_weight if expert_weight is not None else residual_out,
        x_planes if x_planes is not None else residual_out, zero if zero is not None else residual_out,
        codes, qscale, qsums,
        zero.numel() if zero is not None else 0, d, e, float(eps), h.stride(0) if h is not None else 0,
        embedding.stride(0) if embedding is not None else 0,
        rin.stride(0), residual_out.stride(0), x_out.stride(0), router_w.stride(0) if router_w is not None else 0,
        x_planes.stride(0) if x_planes is not None else 0, codes.stride(0), qsums.stride(0),
        ZERO_BLOCK=min(1024, next_pow2(zero.numel())) if zero is not None and zero.numel() else 0,
        FIRST=h is None, HAS_RES=residual_in is not None, LAYERNORM=norm_b is not None,
        ROUTER=router_w is not None, HAS_RB=router_b is not None, BLOCK_D=block_d, BLOCK_E=next_pow2(e),
        PDL=pdl, X_PLANES=x_planes is not None, KPAD=kpad, SLICE=kpad // parts,
        X_INT8=x_int8 is not None, QPAD=qpad, CUDA=residual_out.is_cuda,
        num_warps=4 if residual_out.is_cuda else 1,
        **pdl_launch(pdl))


def add_norm_rows(residual, h, norm_w, eps, norm_b=None, out_dtype=None):
    """Functional add + norm over rows (a prefill): ``(h + residual, norm(h + residual))`` for ``h [R, d]`` and
    ``residual [R, d]`` fp32 or None (then the residual is ``h``), the norm in ``out_dtype`` (default: ``norm_w``'s
    type; LayerNorm when ``norm_b`` is given, else RMSNorm). One launch; twin: :func:`add_norm_rows_ref`."""
    rows, d = h.shape
    out_res = torch.empty(rows, d, device=h.device, dtype=torch.float32)
    x = torch.empty(rows, d, device=h.device, dtype=out_dtype or norm_w.dtype)
    if rows:
        _launch_add_norm(x, residual, out_res, norm_w, eps, h, None, None, norm_b, None, None, None, None, False)
    return out_res, x


def add_norm_rows_ref(residual, h, norm_w, eps, norm_b=None, out_dtype=None):
    """Twin of :func:`add_norm_rows` (the reference model's expressions)."""
    r = h.float() if residual is None else residual + h.float()
    return r, _norm_ref(r, norm_w, eps, norm_b).to(out_dtype or norm_w.dtype)


def _norm_ref(r, norm_w, eps, norm_b=None):
    """fp32 LayerNorm (``norm_b`` given) or RMSNorm of the fp32 rows ``r``, as the model's norms compute them."""
    if norm_b is not None:
        return F.layer_norm(r, (r.shape[-1],), norm_w.float(), norm_b.float(), eps)
    return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()


def add_norm_ref(residual, norm_w, eps, h=None, token_ids=None, embedding=None, norm_b=None, router_w=None,
                 router_b=None):
    """Functional twin of :func:`add_norm`: ``(new_residual fp32, x fp32, expert_idx | None, expert_weight | None)``."""
    r = embedding[token_ids.long()].float() if h is None else residual.float() + h.float()
    x = _norm_ref(r, norm_w, eps, norm_b)
    if router_w is None:
        return r, x, None, None
    logits = x @ router_w.float().t() + (router_b.float() if router_b is not None else 0.0)
    weight, idx = torch.sigmoid(logits).max(dim=-1)
    return r, x, idx.to(torch.int32), weight


def dt_state_update(dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, y_out, conv=None, pdl: bool = False,
                    block_d: int | None = None, y_planes=None, y_word_sums=None, inputs_ready: bool = False):
    """One token of the SSM, in place on ``ssm_state [B, DI, N]`` fp32 (contiguous per row).

    ``dbc [B, R + 2N]`` (x_proj output: dt low-rank, B, C), ``dt_w [DI, R]`` (any row stride; a multiple of 16
    elements, :func:`aligned_rows`, compiles to 2-3x fewer instructions on CUDA), ``dt_bias [DI]``, ``x, z [B, DI]``
    (conv output and gate), ``A [DI, N]`` fp32 (= -exp(A_log)), ``D_skip [DI]``; ``y_out [B, DI]`` receives
    ``(C . h + D x) * silu(z)``. ``conv = (conv_state [B, DI, W], conv_w [DI, W], conv_b | None)``: ``x`` is the conv
    step's *input*; the kernel applies the conv step (SiLU) and updates ``conv_state`` in place. ``block_d``:
    channels per program (a power of two; default 32 on CUDA, 16 elsewhere). ``y_planes [B, 9, width]`` fp32
    (row-contiguous planes, zero where no channel is): planes 0..7 receive the int4 input planes of ``y_out`` as
    stored (:func:`qmamba.quant.layout.int4_x_planes`; plane 8, the word sums, is left alone). ``y_word_sums [B,
    width / 8]`` fp32, with ``y_planes``: zeroed by the caller; the planes' word sums (plane 8's values) are added
    into it by atomic adds (``DecodePolicy.producer_word_sums``). ``inputs_ready``: ``x``, ``z``, the SSM state and the
    conv state were written two launches or more before this one, so they are read with the weights, before the
    wait of ``pdl`` (the launch before this one waited for the one before it before letting this one start), and
    only ``dbc`` after it (``DecodePolicy.early_reads``)."""
    batch, di = x.shape
    r = dt_w.shape[1]
    n = A.shape[1]
    if tuple(ssm_state.shape) != (batch, di, n) or ssm_state.stride(-1) != 1 or ssm_state.stride(-2) != n:
        raise ValueError(f"dt_state_update: ssm_state must be a row-contiguous [{batch}, {di}, {n}] tensor")
    if A.stride(0) != n or A.stride(1) != 1:
        raise ValueError("dt_state_update: A must be contiguous")
    for name, t in (("dbc", dbc), ("x", x), ("z", z), ("y_out", y_out), ("dt_w", dt_w)):
        if t.stride(-1) != 1:
            raise ValueError(f"dt_state_update: {name} needs a unit stride in its last dimension")
    cs, cw, cb = conv if conv is not None else (ssm_state, dt_w, None)
    if conv is not None:
        width = cw.shape[1]
        if tuple(cs.shape) != (batch, di, width) or cs.stride(2) != 1 or not cw.is_contiguous():
            raise ValueError(f"dt_state_update: conv needs state [{batch}, {di}, W] and contiguous weights [{di}, W]")
    block_d = block_d or (32 if x.is_cuda else 16)
    ypl_k = check_x_planes("dt_state_update", "y_planes", y_planes, batch, di) if y_planes is not None else 1
    if y_word_sums is not None:
        if y_planes is None:
            raise ValueError("dt_state_update: y_word_sums needs y_planes")
        check_word_sums("dt_state_update", "y_word_sums", y_word_sums, batch, ypl_k)
    if block_d & (block_d - 1):
        raise ValueError(f"dt_state_update: block_d must be a power of two, got {block_d}")
    _dt_state_update_kernel[(batch, -(-di // block_d))](
        dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, y_out, cs, cw, cb if cb is not None else dt_bias,
        y_planes if y_planes is not None else ssm_state, di, r, n,
        dbc.stride(0), x.stride(0), z.stride(0), dt_w.stride(0), ssm_state.stride(0), y_out.stride(0),
        cs.stride(0), cs.stride(1), y_planes.stride(0) if y_planes is not None else 0,
        Y_PLANES=y_planes is not None, YPL_K=ypl_k, CONV=conv is not None,
        yws_ptr=y_word_sums if y_word_sums is not None else ssm_state,
        s_yws=y_word_sums.stride(0) if y_word_sums is not None else 0, Y_WSUMS=y_word_sums is not None,
        EARLY=bool(inputs_ready),
        CONV_W=cw.shape[1] if conv is not None else 1,
        HAS_CB=cb is not None, PDL=pdl, BLOCK_D=block_d, BLOCK_R=next_pow2(r), BLOCK_N=next_pow2(n),
        BLOCK_W=next_pow2(cw.shape[1]) if conv is not None else 1, num_warps=4 if x.is_cuda else 1,
        **pdl_launch(pdl))


def aligned_rows(w: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """``w [N, K]`` with a row stride that is a multiple of ``multiple`` elements: ``w`` itself where it already is
    (contiguous rows of such a ``K``), else a ``[N, K]`` view of a zero-padded copy. For :func:`dt_state_update`'s
    ``dt_w``: with a stride Triton can prove divisible by 16 elements it reads each row in 16-byte vectors, one
    channel over 16 threads, instead of one element a thread over all of them (see
    :attr:`qmamba.kernels.decode_linear.DecodePolicy.dt_rows_aligned`)."""
    if w.dim() != 2 or multiple < 1:
        raise ValueError(f"aligned_rows: a 2-D tensor and a positive multiple, got {tuple(w.shape)} / {multiple}")
    n, k = w.shape
    if w.stride(1) == 1 and w.stride(0) % multiple == 0 and w.stride(0) >= k:
        return w
    padded = torch.zeros(n, cdiv(k, multiple) * multiple, dtype=w.dtype, device=w.device)
    padded[:, :k] = w
    return padded[:, :k]


def dt_state_update_ref(dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state, conv=None):
    """Functional twin of :func:`dt_state_update`: ``(y [B, DI] fp32, new_state fp32)``, plus the new conv state
    when ``conv`` is given; nothing is modified."""
    new_conv = None
    if conv is not None:
        conv_state, conv_w, conv_b = conv
        new_conv = torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=2)
        xc = (new_conv.float() * conv_w.float()).sum(-1) + (conv_b.float() if conv_b is not None else 0.0)
        x = F.silu(xc)
    r, n = dt_w.shape[1], A.shape[1]
    dbc = dbc.float()
    dt = F.softplus(dbc[:, :r] @ dt_w.float().t() + dt_bias.float())
    b_ssm, c_ssm = dbc[:, r:r + n], dbc[:, r + n:r + 2 * n]
    h = torch.exp(dt[:, :, None] * A.float()) * ssm_state.float() + (dt * x.float())[:, :, None] * b_ssm[:, None, :]
    y = torch.einsum("bdn,bn->bd", h, c_ssm) + x.float() * D_skip.float()
    y = y * F.silu(z.float())
    return (y, h) if conv is None else (y, h, new_conv)
