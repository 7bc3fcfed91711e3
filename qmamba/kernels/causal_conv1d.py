"""Causal depthwise conv1d with carried state (Mamba's short conv), prefill and decode step, reference twins.

Layout: x [B, L, D] (token-major), weight [D, W], bias [D] or None, conv state [B, D, W] holding the last W
inputs (oldest first). A prompt shorter than W reads zeros (or the carried state) before its first token.

Triton twins with the same signatures: :func:`causal_conv1d_triton` (one program per batch x block of tokens x
block of channels; the programs of the first token block also write the final state) and
:func:`causal_conv1d_update_triton` (one decode step; may update the state in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.kernels._triton import jit, next_pow2, pdl_launch, tl


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, activation: str | None = "silu"):
    """Returns ``(y [B, L, D] in x.dtype, final_state [B, D, W] in x.dtype)``."""
    batch, length, dim = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width)
    # history = last W-1 carried inputs, then the new tokens: [B, D, W-1+L]
    seq = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=2)
    y = F.conv1d(seq[:, :, 1:].float(), weight.float()[:, None, :], None if bias is None else bias.float(),
                 groups=dim)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    final_state = seq[:, :, -width:].contiguous()
    return y.transpose(1, 2).to(x.dtype), final_state


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation: str | None = "silu"):
    """One decode step: ``x [B, D]``, ``conv_state [B, D, W]`` -> ``(y [B, D], new_state [B, D, W])``."""
    # shift the window by one and dot it with the kernel (cheaper than a conv1d launch for one token)
    new_state = torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=2)
    y = (new_state.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return y.to(x.dtype), new_state


# ---- Triton ----------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@jit
def _causal_conv1d_kernel(
    x_ptr, w_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, L, D,
    sx_b, sx_l, sx_d, sw_d, sw_w, ss_b, ss_d, ss_w, sy_b, sy_l, sy_d, so_b, so_d, so_w,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(1)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < L
    dm = d < D
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    for w in tl.static_range(W):
        # y_t uses input position p = t + 1 + w - W (p < 0: carried state slot W + p)
        pos = t + 1 + w - W
        wv = tl.load(w_ptr + d * sw_d + w * sw_w, mask=dm, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + pid_b * sx_b + pos[:, None] * sx_l + d[None, :] * sx_d,
                     mask=(tm & (pos >= 0))[:, None] & dm[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            xv += tl.load(s0_ptr + pid_b * ss_b + d[None, :] * ss_d + (W + pos)[:, None] * ss_w,
                          mask=(tm & (pos < 0))[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + pid_b * sy_b + t[:, None] * sy_l + d[None, :] * sy_d, acc.to(y_ptr.dtype.element_ty),
             mask=tm[:, None] & dm[None, :])
    if pid_l == 0:  # final state: the last W entries of [carried state, x]
        for w in tl.static_range(W):
            pv = tl.zeros((BLOCK_D,), dtype=tl.int32) + (L - W + w)
            fv = tl.load(x_ptr + pid_b * sx_b + pv * sx_l + d * sx_d, mask=dm & (pv >= 0), other=0.0)
            if HAS_STATE:
                sv = tl.load(s0_ptr + pid_b * ss_b + d * ss_d + (W + pv) * ss_w, mask=dm & (pv < 0), other=0.0)
                fv = tl.where(pv >= 0, fv, sv.to(fv.dtype))
            tl.store(sT_ptr + pid_b * so_b + d * so_d + w * so_w, fv.to(sT_ptr.dtype.element_ty), mask=dm)


def _check_conv(x, weight, bias, state, batch, dim):
    width = weight.shape[1] if weight.dim() == 2 else -1
    if tuple(weight.shape) != (dim, width):
        raise ValueError(f"causal conv: weight must be [D={dim}, W], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"causal conv: bias must be [{dim}], got {tuple(bias.shape)}")
    if state is not None and tuple(state.shape) != (batch, dim, width):
        raise ValueError(f"causal conv: state must be {(batch, dim, width)}, got {tuple(state.shape)}")
    return width


def _activation_flag(activation):
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r}")
    return activation == "silu"


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, activation: str | None = "silu",
                         block_l: int | None = None, block_d: int | None = None, num_warps: int | None = None):
    """Triton twin of :func:`causal_conv1d_ref`: ``(y [B, L, D], final_state [B, D, W])`` in x.dtype.
    ``block_l`` (tokens a program), ``block_d`` (channels a program) and ``num_warps`` are tuning knobs
    (``benchmarks/bench_conv.py`` times them); every setting computes the same function."""
    batch, length, dim = x.shape
    width = _check_conv(x, weight, bias, initial_state, batch, dim)
    silu = _activation_flag(activation)
    y = torch.empty(batch, length, dim, device=x.device, dtype=x.dtype)
    final = torch.empty(batch, dim, width, device=x.device, dtype=x.dtype)
    block_l = block_l or (16 if x.is_cuda else 8)
    block_d = block_d or min(next_pow2(dim), 128 if x.is_cuda else 16)
    num_warps = num_warps or (4 if x.is_cuda else 1)
    grid = (batch, max(1, _cdiv(length, block_l)), _cdiv(dim, block_d))
    s0 = initial_state if initial_state is not None else final
    _causal_conv1d_kernel[grid](
        x, weight, bias if bias is not None else weight, s0, y, final, length, dim,
        *x.stride(), *weight.stride(), *s0.stride(), *y.stride(), *final.stride(),
        W=width, HAS_BIAS=bias is not None, HAS_STATE=initial_state is not None, SILU=silu,
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps)
    return y, final


@jit
def _causal_conv1d_update_kernel(
    x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, so_ptr, D, sx_b, sx_d, ss_b, ss_d, ss_w, sw_d, sw_w, sy_b, sy_d,
    so_b, so_d, so_w,
    W: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    w = tl.arange(0, BLOCK_W)
    dm = d < D
    # new window = [state[1:], x]: slot w reads state slot w + 1, the last slot reads x. The old state, the weights
    # and the bias come before a programmatic-dependent-launch wait (the state was written a token ago), x after it
    from_state = (w < W - 1)[None, :] & dm[:, None]
    win = tl.load(s_ptr + pid_b * ss_b + d[:, None] * ss_d + (w + 1)[None, :] * ss_w, mask=from_state, other=0.0)
    wmask = dm[:, None] & (w < W)[None, :]
    wt = tl.load(w_ptr + d[:, None] * sw_d + w[None, :] * sw_w, mask=wmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    xv = tl.load(x_ptr + pid_b * sx_b + d * sx_d, mask=dm, other=0.0)
    win = tl.where((w == W - 1)[None, :], xv[:, None].to(win.dtype), win)
    acc = tl.sum(win.to(tl.float32) * wt, axis=1)
    if HAS_BIAS:
        acc += bias
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(so_ptr + pid_b * so_b + d[:, None] * so_d + w[None, :] * so_w, win.to(so_ptr.dtype.element_ty),
             mask=wmask)
    tl.store(y_ptr + pid_b * sy_b + d * sy_d, acc.to(y_ptr.dtype.element_ty), mask=dm)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation: str | None = "silu",
                                out_state=None, out=None, pdl: bool = False):
    """Triton twin of :func:`causal_conv1d_update_ref`: ``(y [B, D], new_state [B, D, W])``.

    ``out_state=conv_state`` updates the state in place (each program reads its whole window before writing it);
    ``out`` (``[B, D]``, any float dtype) receives y instead of a new tensor. ``pdl`` (Hopper and newer, inside the
    decode step's CUDA graph): a programmatic dependent launch that reads the old state, the weights and the bias
    before waiting for the kernel before it (x's producer), and x after. The state must not be written by that
    kernel or the one before it.
    """
    batch, dim = x.shape
    width = _check_conv(x, weight, bias, conv_state, batch, dim)
    silu = _activation_flag(activation)
    out_state = torch.empty_like(conv_state) if out_state is None else out_state
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype) if out is None else out
    block_d = min(next_pow2(dim), 256 if x.is_cuda else 32)
    grid = (batch, _cdiv(dim, block_d))
    _causal_conv1d_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, y, out_state, dim,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(), *out_state.stride(),
        W=width, BLOCK_W=next_pow2(width), HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, PDL=pdl,
        num_warps=4 if x.is_cuda else 1, **pdl_launch(pdl))
    return y, out_state
