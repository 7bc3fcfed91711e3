"""Decode-step linear layers ``out = f(x) @ W_hat^T`` for a few rows (M <= 8), latency first, in Triton.

A decode token of BlackMamba-2.8B is ~150 small dependent kernels, each moving 1-6 MB: its time is launch and
dependency latency, not bytes (benchmarks/results.md, "Decode"). These kernels are built for that:

* **whole rows per program, no split-K**: a program owns ``BLOCK_N`` output rows over all of K, so there are no
  atomics, no zeroed workspace and each output is written once;
* **weights before the wait** (programmatic dependent launch, ``PDL``): a program loads its whole weight tile (and
  scales) into registers, *then* waits for the previous kernel (``gdc_wait``), then reads its input. Inside a CUDA
  graph the next kernel is launched while the previous one runs, so its weight loads overlap the previous kernel's
  tail. Only weights (constant during a step) are read before the wait; expert weights, whose choice comes from
  the previous kernel, are read after it. Each kernel lets its own dependents launch right after its wait;
* **fused prologues / epilogues** that remove whole kernels: the causal-conv step in front of ``x_proj``
  (``conv_x``: ``silu(conv(state, x) + b)`` recomputed by each program from the old conv state; the dt kernel,
  which runs after every reader, writes the new state), and the gated activation after ``fc1``
  (``gated``: a program computes gate rows ``n`` and up rows ``F + n`` of its expert and writes ``act(gate) * up``).

Formats: float (any dtype), int8 (per-row scale), int4 (:mod:`qmamba.quant.layout` group-wise layout read as 32-bit
words; ``code | 0x4B000000`` is the float ``2^23 + code``, so one subtraction gives ``code - zero`` exactly).
Routing: ``row_expert [M]`` (top-1 MoE) picks each row's expert; program column ``e`` serves the rows routed to
expert ``e`` and reads only that expert's weights (an idle column reads nothing).

The pure-PyTorch twin is :func:`decode_linear_ref`. :class:`DecodePolicy` holds the launch choices (PDL on or off,
tile widths) as an explicit argument, never module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmamba.kernels._triton import HAS_TRITON, jit, next_pow2, tl
from qmamba.kernels.fused_moe import ACTIVATION_IDS, activate, gated_act_ref
from qmamba.kernels.weights import FMT_FLOAT, FMT_INT4, FMT_INT8, PackedWeight, int32_words

MAX_ROWS = 8


# ---- policy --------------------------------------------------------------------------------------------------------
def pdl_supported(device) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that exposes ``gdc_wait``."""
    if not HAS_TRITON or device.type != "cuda":
        return False
    try:
        from triton.language.extra import cuda as tl_cuda  # noqa: F401

        ok = hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")
    except ImportError:
        return False
    return ok and torch.cuda.get_device_capability(device)[0] >= 9


@dataclass(frozen=True)
class DecodePolicy:
    """Launch choices of the decode kernels. ``rows_per_program``: output rows a program owns, by ``(format, rows)``
    class (see :meth:`block_n`); ``num_warps`` likewise."""

    pdl: bool = False
    block_n_int4: int = 8
    block_n_float: int = 4
    num_warps: int = 4
    int4_unpack: str = "words"   # "words": 32-bit words, codes via the 2^23 trick; "join": bytes unpacked in k order
    max_rows: int = MAX_ROWS     # batch sizes above this take the general matmul kernels (caller's choice)
    formats: tuple = (FMT_FLOAT, FMT_INT8, FMT_INT4)  # weight formats these kernels serve for the caller

    def takes(self, weight, rows: int) -> bool:
        """Whether a caller should run ``weight`` at ``rows`` rows through :func:`decode_linear`."""
        return isinstance(weight, PackedWeight) and weight.fmt in self.formats and rows <= min(self.max_rows, MAX_ROWS)

    @classmethod
    def for_device(cls, device) -> "DecodePolicy":
        """CUDA: what measured fastest on the H200 (benchmarks/results.md, "Decode step"): these kernels for float
        weights at batch 1 (0.70 vs 1.01 ms/token for bf16 BlackMamba-2.8B); int4 words at batch 1 and every
        format at batch 8 measured slower than the general kernels (1.2 vs 0.98 ms; 14.6 vs 2.4 ms), so those stay
        on them. CPU (interpreter): every format and batch, wide row blocks (few programs)."""
        if device.type != "cuda":
            return cls(pdl=False, block_n_int4=64, block_n_float=64, num_warps=1)
        return cls(pdl=pdl_supported(device), max_rows=1, formats=(FMT_FLOAT,))

    def block_n(self, fmt: int, rows: int, n: int) -> int:
        bn = self.block_n_int4 if fmt == FMT_INT4 else self.block_n_float
        bn = max(1, bn // (1 if rows <= 2 else 2 if rows <= 4 else 4))
        return min(bn, next_pow2(n))


# ---- kernel --------------------------------------------------------------------------------------------------------
@jit
def _load_tile(w_ptr, s_ptr, z_ptr, e64, rows, rows_ok, K, swe, swn, sse, ssn, sze, szn,
               FMT: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr):
    """The weight rows ``rows`` of expert ``e64`` as stored, into registers: ``(words [BN, NBP, WPG] int32, scale
    [BN, NBP] fp32, 2^23 + zero [BN, NBP] fp32)`` for int4, ``(w [BN, KP], row scale [BN] fp32, unused)`` otherwise.
    Masked (no memory read) where ``rows_ok`` is false."""
    if FMT == 2:
        g = tl.arange(0, NBP)
        j = tl.arange(0, WPG)
        n_groups = (K + WPG * 8 - 1) // (WPG * 8)
        gm = (g < n_groups)[None, :] & rows_ok[:, None]
        w = tl.load(w_ptr + e64 * swe + rows[:, None, None] * swn + (g * WPG)[None, :, None] + j[None, None, :],
                    mask=gm[:, :, None], other=0)
        scale = tl.load(s_ptr + e64 * sse + rows[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
        zb = tl.load(z_ptr + e64 * sze + rows[:, None] * szn + (g // 2)[None, :], mask=gm, other=0).to(tl.int32)
        zero = ((zb >> ((g % 2) * 4)[None, :]) & 0xF).to(tl.float32) + 8388608.0
    elif FMT == 3:  # int4 as bytes [BN, NBP, G/2] (G = 8 * WPG), unpacked later in k order
        g = tl.arange(0, NBP)
        j = tl.arange(0, WPG * 4)
        n_groups = (K + WPG * 8 - 1) // (WPG * 8)
        gm = (g < n_groups)[None, :] & rows_ok[:, None]
        w = tl.load(w_ptr + e64 * swe + rows[:, None, None] * swn + (g * WPG * 4)[None, :, None] + j[None, None, :],
                    mask=gm[:, :, None], other=0)
        scale = tl.load(s_ptr + e64 * sse + rows[:, None] * ssn + g[None, :], mask=gm, other=0.0).to(tl.float32)
        zb = tl.load(z_ptr + e64 * sze + rows[:, None] * szn + (g // 2)[None, :], mask=gm, other=0).to(tl.int32)
        zero = ((zb >> ((g % 2) * 4)[None, :]) & 0xF).to(tl.float32)
    else:
        k = tl.arange(0, KP)
        wm = rows_ok[:, None] & (k < K)[None, :]
        w = tl.load(w_ptr + e64 * swe + rows[:, None] * swn + k[None, :], mask=wm, other=0.0)
        if FMT == 1:
            scale = tl.load(s_ptr + e64 * sse + rows * ssn, mask=rows_ok, other=0.0).to(tl.float32)
        else:
            scale = tl.full((w.shape[0],), 1.0, tl.float32)
        zero = scale
    return w, scale, zero


@jit
def _input_at(x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, k, km,
              CONV: tl.constexpr, CONV_W: tl.constexpr, HAS_CB: tl.constexpr):
    """Input row ``r`` at positions ``k`` (any shape; ``km`` its mask) in fp32. ``CONV``: the conv step's output
    ``silu(sum_j state[j + 1] w[j] + x w[W-1] + b)`` from the old state ``st``."""
    x = tl.load(x_ptr + r * sxm + k, mask=km, other=0.0).to(tl.float32)
    if CONV:
        acc = x * tl.load(cw_ptr + k * CONV_W + (CONV_W - 1), mask=km, other=0.0).to(tl.float32)
        for t in tl.static_range(CONV_W - 1):
            acc += tl.load(st_ptr + r * ss_m + k * ss_d + (t + 1), mask=km, other=0.0).to(tl.float32) * \
                tl.load(cw_ptr + k * CONV_W + t, mask=km, other=0.0).to(tl.float32)
        if HAS_CB:
            acc += tl.load(cb_ptr + k, mask=km, other=0.0).to(tl.float32)
        x = tl.where(km, acc * tl.sigmoid(acc), 0.0)
    return x


@jit
def _dot_row(w, scale, zero, x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, K, row_ok,
             FMT: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, CONV: tl.constexpr,
             CONV_W: tl.constexpr, HAS_CB: tl.constexpr):
    """``[BN]`` fp32: the tile times input row ``r``. int4: word ``(g, w)`` holds k = ``(g * WPG + w) * 8 + i`` in
    bits ``4i..4i+3``; codes become floats as ``bits(code | 0x4B000000) - (2^23 + zero)`` (exact), summed per
    group, times the group scale. A row that is not ``row_ok`` reads nothing (its K limit is 0)."""
    k_lim = tl.where(row_ok, K, 0)  # scalar masks fold into limits: the interpreter rejects vector & scalar masks
    if FMT == 2:
        kw = (tl.arange(0, NBP)[:, None] * WPG + tl.arange(0, WPG)[None, :]) * 8                    # [NBP, WPG]
        part = tl.zeros(w.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            km = kw + i < k_lim
            xi = _input_at(x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, kw + i, km, CONV, CONV_W, HAS_CB)
            code = ((w >> (4 * i)) & 0xF) | 0x4B000000
            part += (code.to(tl.float32, bitcast=True) - zero[:, :, None]) * xi[None, :, :]
        y = tl.sum(tl.sum(part, axis=2) * scale, axis=1)
    elif FMT == 3:
        # bytes -> codes in k order (low nibble even k): [BN, NBP, G/2] -> join -> [BN, NBP, G]; x read contiguous
        q = tl.reshape(tl.join(w & 0xF, w >> 4), (w.shape[0], NBP, WPG * 8)).to(tl.float32)
        k = tl.arange(0, NBP)[:, None] * (WPG * 8) + tl.arange(0, WPG * 8)[None, :]
        x = _input_at(x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, k, k < k_lim, CONV, CONV_W, HAS_CB)
        y = tl.sum((tl.sum(q * x[None, :, :], axis=2) - zero * tl.sum(x, axis=1)[None, :]) * scale, axis=1)
    else:
        k = tl.arange(0, KP)
        x = _input_at(x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, k, k < k_lim, CONV, CONV_W, HAS_CB)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) * scale
    return y


@jit
def _dot_rows_int4(w, scale, zero, x_ptr, rr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, K, M,
                   NBP: tl.constexpr, WPG: tl.constexpr, CONV: tl.constexpr, CONV_W: tl.constexpr,
                   HAS_CB: tl.constexpr):
    """``[ROWS, BN]`` fp32: int4 tile times the input rows ``rr`` (rows >= M read nothing), each code unpacked once."""
    kw = (tl.arange(0, NBP)[:, None] * WPG + tl.arange(0, WPG)[None, :]) * 8                        # [NBP, WPG]
    k_lim = tl.where(rr < M, K, 0)
    part = tl.zeros((rr.shape[0], w.shape[0], w.shape[1]), dtype=tl.float32)                      # [R, BN, NBP]
    for i in tl.static_range(8):
        k = kw[None, :, :] + i
        xi = _input_at(x_ptr, rr[:, None, None], sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, k,
                       k < k_lim[:, None, None], CONV, CONV_W, HAS_CB)                              # [R, NBP, WPG]
        wf = (((w >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zero[:, :, None]  # [BN, NBP, WPG]
        part += tl.sum(wf[None, :, :, :] * xi[:, None, :, :], axis=3)
    return tl.sum(part * scale[None, :, :], axis=2)


@jit
def _decode_linear_kernel(
    x_ptr, st_ptr, cw_ptr, cb_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rexp_ptr, rscale_ptr, out_ptr,
    M, N, K, N_UP, sxm, ss_m, ss_d, som, swe, swn, sse, ssn, sze, szn,
    FMT: tl.constexpr, ROWS: tl.constexpr, ROUTED: tl.constexpr, CONV: tl.constexpr, CONV_W: tl.constexpr,
    HAS_CB: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RSCALE: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, WPG: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    if ROUTED:
        # the expert of each row comes from the previous kernel: wait first, then read only this expert's tile.
        # One row: one program column, the row's expert. Several: column e serves the rows routed to expert e and
        # an idle column does nothing at all.
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if ROWS == 1:
            expert = tl.load(rexp_ptr)
            active = expert >= 0
        else:
            expert = pid_e
            r_idx = tl.arange(0, ROWS)
            routed = tl.load(rexp_ptr + r_idx, mask=r_idx < M, other=-1)
            active = tl.sum((routed == pid_e).to(tl.int32), axis=0) > 0
        if active:
            e64 = expert.to(tl.int64)
            w, scale, zero = _load_tile(w_ptr, s_ptr, z_ptr, e64, rows, rows_ok, K, swe, swn, sse, ssn, sze,
                                        szn, FMT, KP, NBP, WPG)
            if GATED:
                w_up, scale_up, zero_up = _load_tile(w_ptr, s_ptr, z_ptr, e64, rows + N_UP, rows_ok, K, swe, swn,
                                                     sse, ssn, sze, szn, FMT, KP, NBP, WPG)
            else:
                w_up, scale_up, zero_up = w, scale, zero
            _rows_out(w, scale, zero, w_up, scale_up, zero_up, x_ptr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
                      bias_ptr, rexp_ptr, rscale_ptr, out_ptr, som, rows, rows_ok, expert, M, N, K,
                      FMT, ROWS, ROUTED, CONV, CONV_W, HAS_CB, GATED, ACT, HAS_BIAS, HAS_RSCALE, KP, NBP, WPG)
    else:
        e64 = pid_e.to(tl.int64) * 0
        w, scale, zero = _load_tile(w_ptr, s_ptr, z_ptr, e64, rows, rows_ok, K, swe, swn, sse, ssn, sze,
                                    szn, FMT, KP, NBP, WPG)
        if GATED:
            w_up, scale_up, zero_up = _load_tile(w_ptr, s_ptr, z_ptr, e64, rows + N_UP, rows_ok, K, swe, swn,
                                                 sse, ssn, sze, szn, FMT, KP, NBP, WPG)
        else:
            w_up, scale_up, zero_up = w, scale, zero
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _rows_out(w, scale, zero, w_up, scale_up, zero_up, x_ptr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
                  bias_ptr, rexp_ptr, rscale_ptr, out_ptr, som, rows, rows_ok, pid_e, M, N, K,
                  FMT, ROWS, ROUTED, CONV, CONV_W, HAS_CB, GATED, ACT, HAS_BIAS, HAS_RSCALE, KP, NBP, WPG)


@jit
def _rows_out(w, scale, zero, w_up, scale_up, zero_up, x_ptr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d,
              bias_ptr, rexp_ptr, rscale_ptr, out_ptr, som, rows, rows_ok, expert, M, N, K,
              FMT: tl.constexpr, ROWS: tl.constexpr, ROUTED: tl.constexpr, CONV: tl.constexpr,
              CONV_W: tl.constexpr, HAS_CB: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr,
              WPG: tl.constexpr):
    """Each input row (that is routed here) times the tile(s), epilogue, store. A row that is not computed costs a
    branch, no arithmetic."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    if FMT == 2 and ROWS > 1 and not ROUTED:
        # every row uses the same tile: unpack each code once, multiply it into all rows
        rr = tl.arange(0, ROWS)
        y = _dot_rows_int4(w, scale, zero, x_ptr, rr, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, K, M, NBP, WPG,
                           CONV, CONV_W, HAS_CB)                                                   # [ROWS, BN]
        if HAS_BIAS:
            y += bias[None, :]
        if GATED:
            y = activate(y, ACT) * _dot_rows_int4(w_up, scale_up, zero_up, x_ptr, rr, sxm, st_ptr, cw_ptr, cb_ptr,
                                                  ss_m, ss_d, K, M, NBP, WPG, CONV, CONV_W, HAS_CB)
        if HAS_RSCALE:
            y = y * tl.load(rscale_ptr + rr, mask=rr < M, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rr[:, None] * som + rows[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=(rr < M)[:, None] & rows_ok[None, :])
    else:
        for r in tl.static_range(ROWS):
            row_ok = (tl.program_id(1) * 0 + r) < M  # a tensor (the interpreter rejects a Python bool mask)
            if ROUTED and ROWS > 1:
                row_ok = row_ok & (tl.load(rexp_ptr + r, mask=row_ok, other=-1) == expert)
            if row_ok:
                y = _dot_row(w, scale, zero, x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr, ss_m, ss_d, K, row_ok, FMT, KP, NBP,
                             WPG, CONV, CONV_W, HAS_CB)
                if HAS_BIAS:
                    y += bias
                if GATED:
                    y = activate(y, ACT) * _dot_row(w_up, scale_up, zero_up, x_ptr, r, sxm, st_ptr, cw_ptr, cb_ptr,
                                                    ss_m, ss_d, K, row_ok, FMT, KP, NBP, WPG, CONV, CONV_W, HAS_CB)
                if HAS_RSCALE:
                    y = y * tl.load(rscale_ptr + r).to(tl.float32)
                tl.store(out_ptr + r * som + rows, y.to(out_ptr.dtype.element_ty), mask=rows_ok)


# ---- launcher and reference twin -------------------------------------------------------------------------------------
def _weight_args(weight: PackedWeight):
    """``(w, s, z, strides, KP, NBP, WPG)`` as the kernel reads them (int4 packed bytes as int32 words)."""
    if weight.fmt == FMT_INT4:
        words = int32_words(weight.qweight)
        if words is None:
            raise ValueError("decode_linear: int4 rows are not a whole number of aligned 32-bit words")
        g = weight.group_size
        if g % 8:
            raise ValueError(f"decode_linear: int4 group size {g} is not a multiple of 8")
        n_groups = weight.k_padded // g
        s, z = weight.scales, weight.zeros
        return (words, s, z, (words.stride(0), words.stride(1), s.stride(0), s.stride(1), z.stride(0), z.stride(1)),
                1, next_pow2(n_groups), g // 8)
    q = weight.qweight
    s = weight.scales if weight.scales is not None else q
    return q, s, q, (q.stride(0), q.stride(1), s.stride(0), s.stride(1) if s.dim() > 1 else 0, 0, 0), \
        next_pow2(weight.k), 1, 1


def decode_linear(x, weight: PackedWeight, out, *, bias=None, row_expert=None, row_scale=None, conv=None,
                  gated: str | None = None, policy: DecodePolicy | None = None):
    """``out [M, N']`` (any float dtype) receives ``f(x) @ W_hat^T`` for ``M <= 8`` rows; semantics of
    :func:`decode_linear_ref`.

    ``conv = (conv_state [M, K, W], conv_w [K, W], conv_b [K] | None)``: the input is the conv step's output
    ``silu(conv([state[:, :, 1:], x]) + b)`` (``x [M, K]`` is the new conv input; the state is not written).
    ``gated = activation name``: the weight is ``[.., 2F, K]`` and ``out [M, F]`` gets ``act(x W_gate^T) * (x W_up^T)``
    (the bias, if any, applies to the gate half only and must be None for gated weights).
    ``row_expert [M]`` int32 picks each row's expert of a stacked weight; ``row_scale [M]`` multiplies each row.
    """
    policy = policy or DecodePolicy.for_device(x.device)
    m, k = x.shape
    if k != weight.k or m > MAX_ROWS or m < 1:
        raise ValueError(f"decode_linear: x must be [1..{MAX_ROWS}, {weight.k}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("decode_linear: x needs a unit stride along K")
    n_out = weight.n // 2 if gated else weight.n
    if tuple(out.shape) != (m, n_out) or out.stride(1) != 1:
        raise ValueError(f"decode_linear: out must be a row-major [{m}, {n_out}] tensor, got {tuple(out.shape)}")
    if gated and bias is not None:
        raise ValueError("decode_linear: a gated weight takes no bias")
    if row_expert is None and weight.n_experts != 1:
        raise ValueError("decode_linear: a stacked weight needs row_expert")
    w, s, z, strides, kp, nbp, wpg = _weight_args(weight)
    fmt = weight.fmt
    if fmt == FMT_INT4 and policy.int4_unpack == "join":
        fmt, w = 3, weight.qweight.reshape(weight.n_experts, weight.n, -1)
        strides = (w.stride(0), w.stride(1)) + strides[2:]
    st, cw, cb = conv if conv is not None else (x, x, None)
    if conv is not None:
        width = cw.shape[1]
        if tuple(st.shape) != (m, k, width) or st.stride(2) != 1 or tuple(cw.shape) != (k, width) or \
                not cw.is_contiguous():
            raise ValueError("decode_linear: conv needs state [M, K, W] (unit last stride) and contiguous w [K, W]")
    bn = policy.block_n(weight.fmt, m, n_out)
    grid = (weight.n_experts if row_expert is not None and m > 1 else 1, -(-n_out // bn))
    dummy = x
    kwargs = dict(launch_pdl=True) if policy.pdl else {}
    _decode_linear_kernel[grid](
        x, st, cw, cb if cb is not None else dummy, w, s, z, bias if bias is not None else dummy,
        row_expert if row_expert is not None else dummy, row_scale if row_scale is not None else dummy, out,
        m, n_out, k, n_out if gated else 0, x.stride(0), st.stride(0), st.stride(1), out.stride(0), *strides,
        FMT=fmt, ROWS=next_pow2(m), ROUTED=row_expert is not None, CONV=conv is not None,
        CONV_W=cw.shape[1] if conv is not None else 1, HAS_CB=cb is not None, GATED=gated is not None,
        ACT=ACTIVATION_IDS[gated] if gated else 0, HAS_BIAS=bias is not None, HAS_RSCALE=row_scale is not None,
        KP=kp, NBP=nbp, WPG=wpg, BLOCK_N=bn, PDL=policy.pdl, num_warps=policy.num_warps, **kwargs)
    return out


def conv_step_ref(x, conv_state, conv_w, conv_b):
    """The conv step's output ``silu(conv([state[:, :, 1:], x]) + b)`` in fp32 (state unchanged)."""
    window = torch.cat([conv_state[:, :, 1:].float(), x.float()[:, :, None]], dim=2)
    y = (window * conv_w.float()).sum(-1)
    if conv_b is not None:
        y = y + conv_b.float()
    return F.silu(y)


def decode_linear_ref(x, weight: PackedWeight, *, bias=None, row_expert=None, row_scale=None, conv=None,
                      gated: str | None = None):
    """Twin of :func:`decode_linear` in fp32 over the dequantized weight: ``[M, N']``."""
    xf = conv_step_ref(x, *conv) if conv is not None else x.float()
    w = weight.dequantized(torch.float32)
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if row_expert is None else row_expert.long()
    y = torch.einsum("mk,mnk->mn", xf, w[idx])
    if bias is not None:
        y = y + bias.float()
    if gated:
        y = gated_act_ref(y, gated, True).float()
    if row_scale is not None:
        y = y * row_scale.float()[:, None]
    return y
