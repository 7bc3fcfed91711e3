"""Selective scan (Mamba-1 SSM recurrence) for prefill, and its pure-PyTorch reference twin.

Layout is token-major ("channels last"), the layout the projections produce:
    u, delta, z : [B, L, D]      B_ssm, C_ssm : [B, L, N]      A : [D, N]      D_skip, delta_bias : [D]
    initial_state / final state : [B, D, N] float32
Math (fp32):  delta = softplus(delta + delta_bias);  h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
              y_t = <C_t, h_t> + D * u_t;  y_t *= silu(z_t)

Triton twins (same signatures), two prefill methods behind :func:`selective_scan_triton` (``method=``):

- ``"chunked"`` (:func:`selective_scan_chunked`): each thread owns one channel and its ``N`` fp32 states and walks
  time sequentially in registers, ``UNROLL`` steps per loop trip, the next trip's inputs loaded while this one
  computes (no cross-thread traffic except the broadcast B_t / C_t rows); the sum over states for y_t is
  in-thread. Per element: one exp2 (a MUFU instruction, the bound: B*L*D*N of them) and four FP32 ops. To fill the
  GPU at small batch the sequence is split into ``S`` segments run in parallel: a first launch writes each
  segment's summary (its end state from a zero start, and ``sum(dt)``, since the decays of a segment multiply to
  ``exp(A * sum(dt))``), and the second launch starts each segment from the carry composed of the earlier
  summaries and writes y (and, in the last segment, the final state).
- ``"assoc"`` (:func:`selective_scan_assoc`, the first kernel, kept for comparison): one program per (batch,
  block of channels) walks the sequence in chunks of ``BLOCK_T`` steps; inside a chunk the linear recurrence
  ``h_t = a_t h_{t-1} + b_t`` is an associative scan over (a, b) pairs, the fp32 state stays in registers between
  chunks, and only y and the final state are written.

:func:`selective_state_update_triton` is the one-token decode step (optionally in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.kernels._triton import cdiv, jit, next_pow2, tl


def selective_scan_ref(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                       delta_softplus: bool = True):
    """Sequential reference scan: obviously right, slow. Returns ``(y [B, L, D] in u.dtype, state fp32)``."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    A, B_ssm, C_ssm = A.float(), B_ssm.float(), C_ssm.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, length, dim = u.shape
    state = (torch.zeros(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
             if initial_state is None else initial_state.float().clone())
    ys = []
    for t in range(length):
        d_t = delta[:, t, :, None]                                   # [B, D, 1]
        state = torch.exp(d_t * A) * state + d_t * B_ssm[:, t, None, :] * u[:, t, :, None]
        ys.append(torch.einsum("bdn,bn->bd", state, C_ssm[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, dim)
    if D_skip is not None:
        y = y + u * D_skip.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype), state


def selective_state_update_ref(state, x, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None,
                               delta_softplus: bool = True):
    """One decode step of the scan. ``state [B, D, N]`` fp32, ``x, delta, z [B, D]``, ``B_ssm, C_ssm [B, N]``.

    Returns ``(y [B, D] in x.dtype, new_state fp32)``; the input state is not modified.
    """
    y, new_state = selective_scan_ref(x[:, None], delta[:, None], A, B_ssm[:, None], C_ssm[:, None], D_skip,
                                      None if z is None else z[:, None], delta_bias, state, delta_softplus)
    return y[:, 0], new_state


# ---- Triton ----------------------------------------------------------------------------------------------------
@jit
def _linear_combine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 then h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2


@jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@jit
def _selective_scan_kernel(
    u_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, dskip_ptr, dbias_ptr, h0_ptr, y_ptr, hT_ptr,
    L, D, N,
    su_b, su_l, su_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,
    sb_b, sb_l, sb_n, sc_b, sc_l, sc_n, sy_b, sy_l, sy_d, sa_d, sa_n,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < D
    nm = n < N
    dn_mask = dm[:, None] & nm[None, :]
    A = tl.load(a_ptr + d[:, None] * sa_d + n[None, :] * sa_n, mask=dn_mask, other=0.0).to(tl.float32)
    state_off = pid_b * D * N + d[:, None] * N + n[None, :]  # h0 / hT are contiguous [B, D, N]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(dskip_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dbias = tl.load(dbias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    tt = tl.arange(0, BLOCK_T)
    is_last = (tt == BLOCK_T - 1)[:, None, None]
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tt
        tm = t < L
        td_mask = tm[:, None] & dm[None, :]
        tn_mask = tm[:, None] & nm[None, :]
        u = tl.load(u_ptr + pid_b * su_b + t[:, None] * su_l + d[None, :] * su_d, mask=td_mask,
                    other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * sdt_b + t[:, None] * sdt_l + d[None, :] * sdt_d, mask=td_mask,
                     other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + dbias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(td_mask, dt, 0.0)  # padded steps become the identity (a = 1, b = 0)
        bm = tl.load(b_ptr + pid_b * sb_b + t[:, None] * sb_l + n[None, :] * sb_n, mask=tn_mask,
                     other=0.0).to(tl.float32)
        cm = tl.load(c_ptr + pid_b * sc_b + t[:, None] * sc_l + n[None, :] * sc_n, mask=tn_mask,
                     other=0.0).to(tl.float32)
        da = tl.exp(dt[:, :, None] * A[None, :, :])                     # [T, BD, BN]
        dbu = (dt * u)[:, :, None] * bm[:, None, :]
        a_cum, b_cum = tl.associative_scan((da, dbu), 0, _linear_combine)
        hs = a_cum * h[None, :, :] + b_cum
        y = tl.sum(hs * cm[:, None, :], axis=2)                        # [T, BD]
        if HAS_D:
            y += u * dskip[None, :]
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * sz_b + t[:, None] * sz_l + d[None, :] * sz_d, mask=td_mask,
                         other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(y_ptr + pid_b * sy_b + t[:, None] * sy_l + d[None, :] * sy_d, y.to(y_ptr.dtype.element_ty),
                 mask=td_mask)
        h = tl.sum(tl.where(is_last, hs, 0.0), axis=0)
    tl.store(hT_ptr + state_off, h, mask=dn_mask)


def _check_scan_args(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be [B, L, D], got {tuple(u.shape)}")
    batch, length, dim = u.shape
    n = A.shape[1] if A.dim() == 2 else -1
    want = {"delta": (delta, (batch, length, dim)), "A": (A, (dim, n)), "B_ssm": (B_ssm, (batch, length, n)),
            "C_ssm": (C_ssm, (batch, length, n)), "D_skip": (D_skip, (dim,)), "z": (z, (batch, length, dim)),
            "delta_bias": (delta_bias, (dim,)), "initial_state": (initial_state, (batch, dim, n))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective scan: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t is not None and t.device != u.device:
            raise ValueError(f"selective scan: {name} is on {t.device}, u on {u.device}")
    return batch, length, dim, n


def selective_scan_assoc(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                         delta_softplus: bool = True, block_t: int | None = None, block_d: int | None = None,
                         num_warps: int | None = None):
    """The associative-scan method of :func:`selective_scan_triton` (the first kernel, kept for comparison)."""
    batch, length, dim, n = _check_scan_args(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state)
    y = torch.empty(batch, length, dim, device=u.device, dtype=u.dtype)
    final = torch.empty(batch, dim, n, device=u.device, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    block_n = next_pow2(n)
    block_t = block_t or (32 if u.is_cuda else 16)
    block_d = block_d or max(1, min(next_pow2(dim), 256 // block_n if u.is_cuda else 64))
    grid = (batch, triton_cdiv(dim, block_d))
    dummy = u
    _selective_scan_kernel[grid](
        u, delta, z if z is not None else dummy, B_ssm, C_ssm, A, D_skip if D_skip is not None else dummy,
        delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else final, y, final,
        length, dim, n,
        *u.stride(), *delta.stride(), *(z.stride() if z is not None else (0, 0, 0)),
        *B_ssm.stride(), *C_ssm.stride(), *y.stride(), *A.stride(),
        HAS_Z=z is not None, HAS_D=D_skip is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
        SOFTPLUS=bool(delta_softplus), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=num_warps or (8 if u.is_cuda else 1))
    return y, final


# ---- chunked method: a channel per thread, time in registers, segments in parallel ---------------------------------
@jit
def _exp2(x, FAST: tl.constexpr):
    """2^x. ``FAST`` (compiled CUDA only; the interpreter has no inline PTX): the one-instruction MUFU forms
    (``ex2/lg2/rcp.approx.ftz``) instead of the denormal-safe sequences; results below 2^-126 flush to zero,
    which for a decay factor, a softplus or a sigmoid changes nothing."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@jit
def _softplus_fast(x, FAST: tl.constexpr):
    """softplus in base 2: ``log2(1 + 2^(x log2 e)) ln 2`` (two MUFU instructions with ``FAST``)."""
    if FAST:
        e = _exp2(tl.minimum(x, 20.0) * 1.4426950408889634, FAST) + 1.0
        lg = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [e], dtype=tl.float32,
                                       is_pure=True, pack=1)
        return tl.where(x > 20.0, x, lg * 0.6931471805599453)
    else:
        return _softplus(x)


@jit
def _softplus_log2(x, ASM: tl.constexpr):
    """softplus as ``log2(1 + 2^(x log2 e)) ln 2``, the logarithm one ``lg2.approx.f32`` (``ASM``, compiled CUDA only:
    the interpreter has no inline PTX; else ``tl.log2``), instead of ``tl.log`` / ``tl.log2``, which compile to an
    accurate polynomial (~35 SASS instructions a value with Triton 3.6: a fifth of a scan step's). Same
    cancellation as :func:`_softplus` for very negative x; the approximate logarithm adds ~2^-22 absolute error."""
    e = 1.0 + tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    if ASM:
        lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [e], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lg = tl.log2(e)
    return tl.where(x > 20.0, x, lg * 0.6931471805599453)


@jit
def _sigmoid_fast(x, FAST: tl.constexpr):
    if FAST:
        e = _exp2(-x * 1.4426950408889634, FAST) + 1.0
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.sigmoid(x)


@jit
def _load_state_tile(ptr, row_off, col_stride, row_mask, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A ``[BLOCK_D, BLOCK_N]`` fp32 tile ``ptr[row_off + j * col_stride]`` (zero where ``row_mask`` is off or
    ``j >= N``), built from ``BLOCK_N`` loads of ``[BLOCK_D]`` rows joined along a new last dimension: a join keeps
    its new dimension inside the thread, so the tile has one channel a thread with its states in registers whatever
    order Triton's coalescing would have picked for a 2-D load (Triton 3.6 and 3.9 break its tie in opposite
    ways, and the other order spreads the states over lanes: shuffles at every step)."""
    parts = ()
    for j in tl.static_range(BLOCK_N):
        column = tl.load(ptr + row_off + j * col_stride, mask=row_mask & (row_off * 0 + j < N), other=0.0)
        parts = parts + (column.to(tl.float32),)
    # tile k of a level joins tiles k and k + width of the one before (width: BLOCK_N / 2, / 4, ..., 1), so the
    # row-major reshape below reads the columns in order (joining neighbours would read them bit-reversed)
    for level in tl.static_range(1, 11):  # BLOCK_N <= 1024
        if (BLOCK_N >> level) >= 1:
            joined = ()
            for k in tl.static_range(BLOCK_N >> level):
                joined = joined + (tl.join(parts[k], parts[k + (BLOCK_N >> level)]),)
            parts = joined
    return tl.reshape(parts[0], (BLOCK_D, BLOCK_N))


@jit
def _bc_row(row_ptr, t, s_l: tl.constexpr, n, s_n, nm, EVEN_N: tl.constexpr):
    """Step ``t``'s B (or C) row, ``[BLOCK_N]`` fp32 (the same addresses across the warp: each thread holds all)."""
    if EVEN_N:
        return tl.load(row_ptr + t * s_l + n * s_n).to(tl.float32)
    else:
        return tl.load(row_ptr + t * s_l + n * s_n, mask=nm, other=0.0).to(tl.float32)


# sa_n / sh_n are 1 at run time but must not be specialised to the constant 1: the state tiles would then look
# contiguous along N to Triton's coalescing pass, which would vectorise along N and spread a channel's states over
# lanes (a shared-memory layout conversion at every step: 10x slower, measured on the H200). The tiles are built by
# _load_state_tile, one channel a thread, on every Triton version: left to the coalescing pass, a 2-D tile's order was
# a tie that Triton 3.6 and 3.9 break in opposite ways, and the wrong one cost 18-64 shuffles a step (sessions 21 and
# 46; benchmarks/inspect_scan_kernel.py shows them)
@jit(do_not_specialize=["sa_n", "sh_n", "su_d", "sdt_d", "sz_d", "sy_d"])
def _chunked_scan_kernel(
    u_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, dskip_ptr, dbias_ptr, h0_ptr, y_ptr, hT_ptr, sum_h_ptr, sum_dt_ptr,
    L, D, N, SEG, NSEG,
    su_b, su_d, sdt_b, sdt_d, sz_b, sz_d, sb_b, sb_n, sc_b, sc_n, sy_b, sy_d, sa_d, sa_n, sh_d, sh_n,
    su_l: tl.constexpr, sdt_l: tl.constexpr, sz_l: tl.constexpr, sb_l: tl.constexpr, sc_l: tl.constexpr,
    sy_l: tl.constexpr, SUMMARY: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_EXP: tl.constexpr, SP_LOG2: tl.constexpr,
    SP_LOG2_ASM: tl.constexpr, EVEN_N: tl.constexpr,
    UNROLL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (batch, block of channels, segment). ``SUMMARY``: write the segment's summary (end state from zero,
    ``sum(dt)``) to ``sum_h [B, S, D, N]`` / ``sum_dt [B, S, D]``; else start from the carry (``h0`` composed
    with the summaries of the earlier segments), write y, and the final state from the last segment.

    State tiles are ``[BLOCK_D, BLOCK_N]``, BLOCK_D = 32 x warps / lanes, one channel a thread with its N states
    in registers (:func:`_load_state_tile`), so the update is element-wise and the sum over states for y is
    in-thread. u, dt, z come as tuples of ``[BLOCK_D]`` rows (one element a thread: a step's row is a register, not
    a pick out of a tile) loaded one trip ahead; the B_t, C_t rows one step ahead (the same addresses across the
    warp, L1/L2 hits); a trip's y rows are stored at its end.
    States are ``[.., D, N]`` with strides ``(sh_d, sh_n)``: h0, hT ([B, D, N]) and sum_h ([B, S, D, N]).
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < D
    nm = n < N
    nd_mask = dm[:, None] & nm[None, :]
    state_off = d[:, None] * sh_d + n[None, :] * sh_n                                   # [BLOCK_D, BLOCK_N]
    # exp(dt * A) = exp2(dt * A * log2(e)); padded states get A = 0, B = C = 0 and stay zero
    A2 = _load_state_tile(a_ptr, d * sa_d, sa_n, dm, N, BLOCK_D, BLOCK_N)
    A2 = A2 * 1.4426950408889634
    if HAS_H0 and not SUMMARY:  # a summary starts from zero
        h = _load_state_tile(h0_ptr + pid_b * D * N, d * sh_d, sh_n, dm, N, BLOCK_D, BLOCK_N)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if not SUMMARY:
        for j in range(0, pid_s):  # carry in: the earlier segments' summaries, in order
            hj = _load_state_tile(sum_h_ptr + (pid_b * NSEG + j) * D * N, d * sh_d, sh_n, dm, N, BLOCK_D, BLOCK_N)
            dtj = tl.load(sum_dt_ptr + (pid_b * NSEG + j) * D + d, mask=dm, other=0.0)
            h = _exp2(dtj[:, None] * A2, FAST_EXP) * h + hj
    if HAS_D:
        dskip = tl.load(dskip_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dbias = tl.load(dbias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    dt_total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_lo = pid_s * SEG
    t_hi = tl.minimum(t_lo + SEG, L)
    u_base = u_ptr + pid_b * su_b + d * su_d                                             # [BLOCK_D]
    dt_base = dt_ptr + pid_b * sdt_b + d * sdt_d
    z_base = z_ptr + pid_b * sz_b + d * sz_d
    y_base = y_ptr + pid_b * sy_b + d * sy_d
    b_row = b_ptr + pid_b * sb_b
    c_row = c_ptr + pid_b * sc_b
    # software pipelining by hand: each trip of UNROLL steps first issues the loads of the next trip (u, dt, z rows
    # carried in registers as tuples of [BLOCK_D] rows, one element a thread: no tile whose layout Triton could
    # spread over lanes, so picking a step's row is free), then computes its own steps, each loading the B, C rows
    # of the step after it (L2 hits, but a few hundred cycles each), then stores its y rows, all of them at the end:
    # a load cannot move above an earlier store to a pointer that might alias, so a store inside the trip would
    # hold the later steps' loads behind it.
    t_col = tl.zeros((BLOCK_D,), dtype=tl.int32)  # a step's index as a row (masks are vectors in the interpreter)
    dt_nx = ()
    u_nx = ()
    z_nx = ()
    for i in tl.static_range(UNROLL):
        rm = dm & (t_col + (t_lo + i) < t_hi)
        dt_nx = dt_nx + (tl.load(dt_base + (t_lo + i) * sdt_l, mask=rm, other=0.0),)
        u_nx = u_nx + (tl.load(u_base + (t_lo + i) * su_l, mask=rm, other=0.0),)
        if HAS_Z and not SUMMARY:
            z_nx = z_nx + (tl.load(z_base + (t_lo + i) * sz_l, mask=rm, other=0.0),)
    b_nx = _bc_row(b_row, tl.minimum(t_lo, t_hi - 1), sb_l, n, sb_n, nm, EVEN_N)
    c_nx = b_nx
    if not SUMMARY:
        c_nx = _bc_row(c_row, tl.minimum(t_lo, t_hi - 1), sc_l, n, sc_n, nm, EVEN_N)
    for t0 in range(t_lo, t_hi, UNROLL):
        dt_cur = dt_nx
        u_cur = u_nx
        z_cur = z_nx
        dt_nx = ()
        u_nx = ()
        z_nx = ()
        for i in tl.static_range(UNROLL):  # prefetch the next trip
            rm = dm & (t_col + (t0 + UNROLL + i) < t_hi)
            dt_nx = dt_nx + (tl.load(dt_base + (t0 + UNROLL + i) * sdt_l, mask=rm, other=0.0),)
            u_nx = u_nx + (tl.load(u_base + (t0 + UNROLL + i) * su_l, mask=rm, other=0.0),)
            if HAS_Z and not SUMMARY:
                z_nx = z_nx + (tl.load(z_base + (t0 + UNROLL + i) * sz_l, mask=rm, other=0.0),)
        y_rows = ()
        for i in tl.static_range(UNROLL):
            b_t = b_nx
            c_t = c_nx
            # the B, C rows of the next step (past the end: an in-bounds row, read and unused; no mask)
            t_next = tl.minimum(t0 + i + 1, t_hi - 1)
            b_nx = _bc_row(b_row, t_next, sb_l, n, sb_n, nm, EVEN_N)
            if not SUMMARY:
                c_nx = _bc_row(c_row, t_next, sc_l, n, sc_n, nm, EVEN_N)
            dt = dt_cur[i].to(tl.float32)
            u = u_cur[i].to(tl.float32)
            if HAS_BIAS:
                dt += dbias
            if SOFTPLUS:
                if SP_LOG2:
                    dt = _softplus_log2(dt, SP_LOG2_ASM)
                else:
                    dt = _softplus_fast(dt, FAST_EXP)
            dt = tl.where(t_col + (t0 + i) < t_hi, dt, 0.0)  # steps past the end: decay 1, input 0
            dtu = dt * u
            if SUMMARY:
                dt_total += dt
            h = _exp2(dt[:, None] * A2, FAST_EXP) * h + dtu[:, None] * b_t[None, :]
            if not SUMMARY:
                y = tl.sum(h * c_t[None, :], axis=1)
                if HAS_D:
                    y += u * dskip
                if HAS_Z:
                    z = z_cur[i].to(tl.float32)
                    y = y * z * _sigmoid_fast(z, FAST_EXP)
                y_rows = y_rows + (y.to(y_ptr.dtype.element_ty),)
        if not SUMMARY:
            for i in tl.static_range(UNROLL):
                tl.store(y_base + (t0 + i) * sy_l, y_rows[i], mask=dm & (t_col + (t0 + i) < t_hi))
    if SUMMARY:
        tl.store(sum_h_ptr + (pid_b * NSEG + pid_s) * D * N + state_off, h, mask=nd_mask)
        tl.store(sum_dt_ptr + (pid_b * NSEG + pid_s) * D + d, dt_total, mask=dm)
    elif pid_s == NSEG - 1:
        tl.store(hT_ptr + pid_b * D * N + state_off, h, mask=nd_mask)


def chunked_segments(batch: int, length: int, dim: int, block_d: int, num_warps: int, is_cuda: bool,
                     warps_per_scheduler: int = 32, max_segments: int = 16, min_steps: int = 64,
                     busy_warps: int = 132, busy_max_segments: int = 8) -> int:
    """How many time segments the chunked scan runs in parallel: enough warps to fill an H200 (132 SMs x 4
    schedulers, ``warps_per_scheduler`` each) when batch x channel blocks alone do not, but segments of at least
    ``min_steps`` steps and at most ``max_segments`` (``busy_max_segments`` from ``busy_warps`` warps before the
    split, as :func:`chunked_step_knobs` counts them; the carry-in of a segment walks the earlier summaries). The
    summary pass costs the same exponentials however many segments there are; more segments only add parallelism
    (the scan is latency-bound: session 12's sweep at B=1, L=2048 went 2662 -> 1835 -> 924 -> 264 us from 1 to 16
    segments) and carry-in work. ``bench_scan.py --sweep`` times 32 and 64 segments beside the default. Session
    46 (H100, the kernel with its B, C rows a step ahead; benchmarks/raw/session46/scan_ab.py): at B = 1 16
    segments at L = 1024 / 2048 (75.2 / 125.1 us against 85.1 / 165.5 with 8), 8 at L = 512 (49.6 against 52.8):
    segments of 64 steps at least; from B = 2, 8 segments (B = 2, L = 2048: 228.9 against 243.5 us; B = 8, L = 512
    / 2048: 213.3 / 692.6 against 286.8 / 749.1; 4 segments: 219.8 / 793.6). Session 18's sweep (H200, the kernel
    before) had taken 16 segments and 32 steps a segment at every shape it timed."""
    if not is_cuda:
        return 1 if length <= 16 else 2
    warps = batch * cdiv(dim, block_d) * num_warps
    want = cdiv(132 * 4 * warps_per_scheduler, warps)
    cap = busy_max_segments if warps >= busy_warps else max_segments
    return int(max(1, min(want, cap, length // min_steps)))


def chunked_step_knobs(batch: int, dim: int, block_d: int, num_warps: int, is_cuda: bool,
                       busy_warps: int = 132) -> tuple[int, bool]:
    """Steps a loop trip and ``softplus_log2`` of the chunked scan by how many warps batch x channel blocks give
    before any time split: from ``busy_warps`` (one a multiprocessor of an H200; BlackMamba-2.8B's 2,944 channels
    from batch 2) 4 steps a trip with dt's softplus through base-2 functions; below that, 8 steps a trip (the few
    warps need the unrolled trip's independent work), with the base-2 softplus too since session 48 (H100,
    scan_ab.py, B = 1: L = 512 / 1,024 / 2,048 47.8 / 73.0 / 119.4 us against 49.4 / 75.1 / 122.7 with the exact
    one, 2-3%; session 46 had chosen the exact one here). Session 46 (H100, Triton 3.6,
    benchmarks/raw/session46/scan_ab.py, 16 segments), the kernel with the rows as tuples and its B, C rows a step
    ahead against the one before (one step a trip when busy, 4 steps below): B = 1, L = 2048 / 4096 125.5 / 228.2
    against 141.6 / 268.3 us; B = 8, L = 2048 / 4096 747 / 1375 against 770 / 1485; one step a trip lost with the
    new kernel (1037 at B = 8, L = 2048), 2 steps too (843). Session 22 (H200) had chosen the old kernel's
    settings; with it, 4 steps cost shuffles. The segments: :func:`chunked_segments`."""
    if not is_cuda:
        return 4, False
    busy = batch * cdiv(dim, block_d) * num_warps >= busy_warps
    return (4, True) if busy else (8, True)


def selective_scan_chunked(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                           delta_softplus: bool = True, n_segments: int | None = None, num_warps: int | None = None,
                           lanes: int | None = None, unroll: int | None = None, fast_exp: bool | None = None,
                           bc_fp32: bool | None = None, softplus_log2: bool | None = None):
    """The chunked method of :func:`selective_scan_triton`: ``(y [B, L, D] in u.dtype, final state fp32)``.

    ``n_segments`` (time segments run in parallel; default :func:`chunked_segments`), ``num_warps``, ``lanes``
    (threads per channel, splitting its N states; channels per program = 32 x warps / lanes), ``unroll`` (steps
    per loop trip; default :func:`chunked_step_knobs`), ``fast_exp`` (one-instruction exp2; CUDA only, off by
    default: slower on the H200), ``bc_fp32`` (B and C converted to one fp32 [B, L, 2N] tensor first, so the hot
    loop, where every thread reads the whole B_t and C_t rows, loads them without a conversion each; default on
    CUDA for 16-bit inputs) and ``softplus_log2`` (dt's softplus through base-2 functions, :func:`_softplus_log2`;
    default :func:`chunked_step_knobs`) are tuning knobs; every setting computes the same function
    (``softplus_log2`` to the approximate base-2 functions' rounding).
    """
    batch, length, dim, n = _check_scan_args(u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state)
    y = torch.empty(batch, length, dim, device=u.device, dtype=u.dtype)
    final = torch.empty(batch, dim, n, device=u.device, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    num_warps = num_warps or 1
    lanes = min(lanes or 1, next_pow2(n))
    block_d = 32 * num_warps // lanes if u.is_cuda else min(next_pow2(dim), 16)
    # the exact exp2 (the one-instruction exp2 took 1153 against 877 us at B = 8, L = 2048; B = 1: 168 against
    # 138; session 18's sweep); 8 steps a trip lost everywhere (session 18: 1483 against 1153 us at B = 8)
    auto_unroll, auto_sp = chunked_step_knobs(batch, dim, block_d, num_warps, u.is_cuda)
    unroll = unroll or auto_unroll
    softplus_log2 = auto_sp if softplus_log2 is None else bool(softplus_log2)
    fast_exp = False if fast_exp is None else bool(fast_exp and u.is_cuda)
    if u.is_cuda if bc_fp32 is None else bc_fp32:
        B_ssm, C_ssm = _bc_fp32(B_ssm, C_ssm)
    segs = n_segments or chunked_segments(batch, length, dim, block_d, num_warps, u.is_cuda)
    seg = cdiv(cdiv(max(length, 1), segs), unroll) * unroll
    segs = max(1, cdiv(length, seg))
    sum_h = final if segs == 1 else torch.empty(batch, segs, dim, n, device=u.device, dtype=torch.float32)
    sum_dt = final if segs == 1 else torch.empty(batch, segs, dim, device=u.device, dtype=torch.float32)
    common = dict(HAS_Z=z is not None, HAS_D=D_skip is not None, HAS_BIAS=delta_bias is not None,
                  HAS_H0=h0 is not None, SOFTPLUS=bool(delta_softplus), FAST_EXP=fast_exp,
                  SP_LOG2=bool(softplus_log2), SP_LOG2_ASM=bool(softplus_log2 and u.is_cuda), UNROLL=unroll,
                  BLOCK_D=block_d, BLOCK_N=next_pow2(n), EVEN_N=next_pow2(n) == n, num_warps=num_warps)
    zs = z.stride() if z is not None else (0, 0, 0)
    args = (u, delta, z if z is not None else u, B_ssm, C_ssm, A, D_skip if D_skip is not None else u,
            delta_bias if delta_bias is not None else u, h0 if h0 is not None else final, y, final, sum_h, sum_dt,
            length, dim, n, seg, segs, u.stride(0), u.stride(2), delta.stride(0), delta.stride(2), zs[0], zs[2],
            B_ssm.stride(0), B_ssm.stride(2), C_ssm.stride(0), C_ssm.stride(2), y.stride(0), y.stride(2),
            *A.stride(), n, 1)
    # the time strides are compile-time constants (one compile per model layout): the unrolled steps' addresses
    # are then immediate offsets from one pointer per input
    common.update(su_l=u.stride(1), sdt_l=delta.stride(1), sz_l=zs[1], sb_l=B_ssm.stride(1),
                  sc_l=C_ssm.stride(1), sy_l=y.stride(1))
    grid = (batch, cdiv(dim, block_d))
    if segs > 1:  # summaries of all segments but the last (whose summary nobody reads)
        _chunked_scan_kernel[grid + (segs - 1,)](*args, SUMMARY=True, **common)
    _chunked_scan_kernel[grid + (segs,)](*args, SUMMARY=False, **common)
    return y, final


def _bc_fp32(B_ssm, C_ssm):
    """B and C as the two halves of one fp32 ``[B, L, 2N]`` tensor (one copy kernel when they are adjacent
    slices of one tensor, as x_proj's output gives them)."""
    b, length, n = B_ssm.shape
    if B_ssm.dtype == torch.float32 and C_ssm.dtype == torch.float32:
        return B_ssm, C_ssm
    if (B_ssm.stride() == C_ssm.stride() and B_ssm.stride(2) == 1 and B_ssm.dtype == C_ssm.dtype
            and C_ssm.data_ptr() == B_ssm.data_ptr() + n * B_ssm.element_size()):
        bc = torch.as_strided(B_ssm, (b, length, 2 * n), (B_ssm.stride(0), B_ssm.stride(1), 1)).float()
    else:
        bc = torch.cat([B_ssm, C_ssm], dim=-1).float()
    return bc[..., :n], bc[..., n:]


METHODS = {"chunked": selective_scan_chunked, "assoc": selective_scan_assoc}
# "auto": chunked from CHUNKED_MIN_TOKENS = B * L tokens, assoc below. H200, bf16, D = 2944, N = 16
# (benchmarks/bench_scan.py, session 13): chunked 2.24-2.36x assoc at B=1, L = 2048 / 4096 and 1.60x at B=8,
# L = 512..4096, but 0.71x at B=1, L=512
DEFAULT_METHOD = "auto"
CHUNKED_MIN_TOKENS = 2048


def _pick_method(method: str, u) -> str:
    if method == "auto":
        return "chunked" if u.shape[0] * u.shape[1] >= CHUNKED_MIN_TOKENS else "assoc"
    return method


def selective_scan_triton(u, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None, initial_state=None,
                          delta_softplus: bool = True, method: str = DEFAULT_METHOD, **tuning):
    """Triton twin of :func:`selective_scan_ref`: ``(y [B, L, D] in u.dtype, final state [B, D, N] fp32)``.

    ``method``: ``"assoc"``, ``"chunked"`` (see the module docstring) or ``"auto"`` (default,
    :data:`DEFAULT_METHOD`: chunked from :data:`CHUNKED_MIN_TOKENS` batch x length tokens); ``tuning`` goes to that
    method's launcher.
    """
    method = _pick_method(method, u)
    if method not in METHODS:
        raise ValueError(f"selective scan: unknown method {method!r}; choose from {sorted(METHODS) + ['auto']}")
    return METHODS[method](u, delta, A, B_ssm, C_ssm, D_skip, z, delta_bias, initial_state, delta_softplus,
                           **tuning)


@jit
def _state_update_kernel(
    h_ptr, x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, dskip_ptr, dbias_ptr, y_ptr, hout_ptr,
    D, N, sh_b, sh_d, sh_n, sx_b, sx_d, sdt_b, sdt_d, sz_b, sz_d, sb_b, sb_n, sc_b, sc_n, sy_b, sy_d,
    so_b, so_d, so_n, sa_d, sa_n,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < D
    nm = n < N
    mask = dm[:, None] & nm[None, :]
    h = tl.load(h_ptr + pid_b * sh_b + d[:, None] * sh_d + n[None, :] * sh_n, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * sx_b + d * sx_d, mask=dm, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * sdt_b + d * sdt_d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dbias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(a_ptr + d[:, None] * sa_d + n[None, :] * sa_n, mask=mask, other=0.0).to(tl.float32)
    bm = tl.load(b_ptr + pid_b * sb_b + n * sb_n, mask=nm, other=0.0).to(tl.float32)
    cm = tl.load(c_ptr + pid_b * sc_b + n * sc_n, mask=nm, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * bm[None, :]
    y = tl.sum(h * cm[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(dskip_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * sz_b + d * sz_d, mask=dm, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(hout_ptr + pid_b * so_b + d[:, None] * so_d + n[None, :] * so_n, h, mask=mask)
    tl.store(y_ptr + pid_b * sy_b + d * sy_d, y.to(y_ptr.dtype.element_ty), mask=dm)


def selective_state_update_triton(state, x, delta, A, B_ssm, C_ssm, D_skip, z=None, delta_bias=None,
                                  delta_softplus: bool = True, out_state=None):
    """Triton twin of :func:`selective_state_update_ref`: ``(y [B, D] in x.dtype, new state fp32)``.

    ``out_state`` (fp32 ``[B, D, N]``) receives the new state; passing ``state`` itself updates it in place (each
    program reads its state tile before writing it). By default a new tensor is returned, as in the reference.
    """
    batch, dim = x.shape
    n = A.shape[1]
    for name, t, shape in (("state", state, (batch, dim, n)), ("delta", delta, (batch, dim)),
                           ("B_ssm", B_ssm, (batch, n)), ("C_ssm", C_ssm, (batch, n)), ("A", A, (dim, n)),
                           ("z", z, (batch, dim))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective state update: {name} must have shape {shape}, got {tuple(t.shape)}")
    if state.dtype != torch.float32:
        raise ValueError(f"selective state update: the SSM state must be float32, got {state.dtype}")
    out_state = torch.empty_like(state) if out_state is None else out_state
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block_n = next_pow2(n)
    block_d = max(1, min(next_pow2(dim), 1024 // block_n if x.is_cuda else 32))
    grid = (batch, triton_cdiv(dim, block_d))
    _state_update_kernel[grid](
        state, x, delta, z if z is not None else x, B_ssm, C_ssm, A, D_skip if D_skip is not None else x,
        delta_bias if delta_bias is not None else x, y, out_state, dim, n,
        *state.stride(), *x.stride(), *delta.stride(), *(z.stride() if z is not None else (0, 0)),
        *B_ssm.stride(), *C_ssm.stride(), *y.stride(), *out_state.stride(), *A.stride(),
        HAS_Z=z is not None, HAS_D=D_skip is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4 if x.is_cuda else 1)
    return y, out_state


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
