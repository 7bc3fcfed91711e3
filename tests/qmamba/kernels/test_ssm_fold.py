"""The SSM update with out_proj folded in (``qmamba.kernels.ssm_fold``) against its twin: the SSM state and conv
state as :func:`dt_state_update_ref` leaves them, and the out_proj share, the next norm's input and the router sums
added into the step's buffers, for float, int4 (stored words and plane words; groups of 128 and 32, which caps the
channels a program), with and without out_proj's bias, D past a 128 multiple; and the router fold itself against
``router_w diag(norm_w) W_out``."""

import pytest
import torch

from qmamba.kernels.decode_step import dt_state_update_ref
from qmamba.kernels.ssm_fold import (FOLD_FLOAT, FOLD_INT4, SsmFold, out_columns, router_fold, ssm_update_fold,
                                     ssm_update_fold_ref)
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.formats import Int4Format, Int8Format

DI, D, R, N, W, E = 256, 200, 8, 16, 4, 5


def _out_proj(fmt, group, device):
    w = torch.randn(D, DI, device=device) * 0.05
    if fmt == "float":
        return PackedWeight.from_float(w)
    q = Int4Format(group)
    pw = q.kernel_weight(q.quantize_rtn(w.cpu()), D, DI)
    pw = PackedWeight(pw.fmt, pw.n, pw.k, pw.n_experts, pw.qweight.to(device), pw.scales.to(device),
                      pw.zeros.to(device), pw.group_size)
    return pw.to_planes() if fmt == "planes" else pw


@pytest.mark.parametrize("fmt,group,block_d,prev,experts", [
    ("float", 0, 16, False, E), ("float", 0, 64, True, E), ("int4", 128, 32, False, E), ("planes", 128, 64, False, E),
    ("int4", 32, 64, True, E), ("planes", 128, 32, True, 0)])
@pytest.mark.parametrize("bias", [False, True])
def test_ssm_fold_matches_reference(fmt, group, block_d, prev, experts, bias, device):
    """``prev``: a previous fold's pending term added into the residual slice by slice (and it and its u zeroed);
    ``experts`` 0: a Mamba layer next (no router)."""
    torch.manual_seed(block_d + bias)
    pw = _out_proj(fmt, group, device)
    cols = out_columns(pw)
    assert cols.fmt == (FOLD_FLOAT if fmt == "float" else FOLD_INT4)
    w_out = pw.dequantized()[0]
    f32 = dict(device=device, dtype=torch.float32)
    dbc = torch.randn(1, R + 2 * N, **f32)
    dt_w, dt_b = torch.randn(DI, R, **f32) * 0.1, torch.randn(DI, **f32) * 0.1
    x, z = torch.randn(1, DI, **f32), torch.randn(1, DI, **f32)
    A, D_skip = -torch.rand(DI, N, **f32), torch.randn(DI, **f32)
    state, conv_state = torch.randn(1, DI, N, **f32), torch.randn(1, DI, W, **f32)
    conv_w, conv_b = torch.randn(DI, W, **f32), torch.randn(DI, **f32)
    norm_w, router_w = torch.rand(D, **f32) + 0.5, torch.randn(experts, D, **f32)
    fold = SsmFold(cols, torch.randn(D, **f32) if bias else None, norm_w, router_w, router_fold(router_w, norm_w, pw),
                   torch.randn(1, D, **f32), torch.randn(1, D, **f32), torch.randn(1, D, **f32),
                   torch.randn(1 + experts + 2, **f32), torch.randn(1, D, **f32) if prev else None,
                   torch.randn(1, D, **f32) if prev else None)
    want = ssm_update_fold_ref(dbc, dt_w, dt_b, x, z, A, D_skip, state, torch.float32, fold, w_out,
                               conv=(conv_state, conv_w, conv_b))
    acc_tail = fold.acc[1 + experts:].clone()
    ssm_update_fold(dbc, dt_w, dt_b, x, z, A, D_skip, state, x, fold, conv=(conv_state, conv_w, conv_b),
                    block_d=block_d)
    torch.testing.assert_close(state, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state, want[1], atol=0, rtol=0)
    torch.testing.assert_close(fold.pending, want[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fold.u, want[3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fold.acc, want[4], atol=1e-3, rtol=1e-4)
    assert torch.equal(fold.acc[1 + experts:], acc_tail)  # only this router's experts
    torch.testing.assert_close(fold.residual, want[5], atol=0, rtol=0)
    if prev:
        assert fold.pending_prev.eq(0).all() and fold.u_prev.eq(0).all()


def test_ssm_fold_twin_is_the_ssm_update_then_out_proj(device):
    """The twin against the plain sequence it replaces: the SSM update, out_proj, the residual add and the norm's
    input and router logits of the next layer computed from the new residual."""
    torch.manual_seed(1)
    pw = _out_proj("float", 0, device)
    w_out = pw.dequantized()[0]
    f32 = dict(device=device, dtype=torch.float32)
    dbc, dt_w, dt_b = torch.randn(1, R + 2 * N, **f32), torch.randn(DI, R, **f32) * 0.1, torch.randn(DI, **f32) * 0.1
    x, z, A, D_skip = torch.randn(1, DI, **f32), torch.randn(1, DI, **f32), -torch.rand(DI, N, **f32), \
        torch.randn(DI, **f32)
    state = torch.randn(1, DI, N, **f32)
    norm_w, router_w, res = torch.rand(D, **f32) + 0.5, torch.randn(E, D, **f32), torch.randn(1, D, **f32)
    fold = SsmFold(out_columns(pw), None, norm_w, router_w, router_fold(router_w, norm_w, pw), res,
                   torch.zeros(1, D, **f32), torch.zeros(1, D, **f32), torch.zeros(1 + E, **f32))
    _, _, pending, u, acc, _ = ssm_update_fold_ref(dbc, dt_w, dt_b, x, z, A, D_skip, state, torch.float32, fold, w_out)
    y, _ = dt_state_update_ref(dbc, dt_w, dt_b, x, z, A, D_skip, state)
    new_res = res + y @ w_out.t()
    torch.testing.assert_close(res + pending, new_res, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u, new_res * norm_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc[1:], router_w @ (new_res * norm_w)[0], atol=1e-4, rtol=1e-4)


def test_out_columns_formats():
    """Float and int4 have a column view; int8 and stacks have none (the step keeps out_proj for them)."""
    w = torch.randn(40, 64)
    assert out_columns(PackedWeight.from_float(w)).w.shape == (40, 64)
    q = Int4Format(32)
    cols = out_columns(q.kernel_weight(q.quantize_rtn(w), 40, 64))
    assert cols.w.shape == (64, 16) and cols.scale.shape == (2, 40) and cols.group_size == 32
    assert out_columns(Int8Format().kernel_weight(Int8Format().quantize_rtn(w), 40, 64)) is None
    assert out_columns(PackedWeight.from_float(torch.randn(2, 40, 64))) is None
