"""The decode-step kernels (residual add + norm + router; dt projection + SSM state update + gate) against their
PyTorch twins, on odd sizes: RMSNorm and LayerNorm, first layer (embedding gather) and later ones, router ties."""

import pytest
import torch

from qmamba.kernels.decode_step import (add_norm, add_norm_ref, add_norm_rows, add_norm_rows_ref, aligned_rows,
                                        dt_state_update, dt_state_update_ref)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("router", [False, True])
def test_add_norm_matches_reference(first, layernorm, router, device):
    torch.manual_seed(0)
    batch, d, e, vocab = 3, 37, 5, 11
    residual = torch.randn(batch, d, device=device)
    h = None if first else torch.randn(batch, d, device=device)
    ids = torch.tensor([4, 0, 10], device=device)
    emb = torch.randn(vocab, d, device=device)
    norm_w = torch.rand(d, device=device) + 0.5
    norm_b = torch.randn(d, device=device) if layernorm else None
    rw = torch.randn(e, d, device=device) if router else None
    rb = torch.randn(e, device=device) if router else None
    ref_r, ref_x, ref_idx, ref_wt = add_norm_ref(residual, norm_w, 1e-5, h, ids, emb, norm_b, rw, rb)
    x = torch.empty(batch, d, device=device)
    idx = torch.full((batch,), -1, dtype=torch.int32, device=device)
    wt = torch.zeros(batch, device=device)
    add_norm(x, residual, norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, norm_b=norm_b, router_w=rw,
             router_b=rb, expert_idx=idx, expert_weight=wt)
    torch.testing.assert_close(residual, ref_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x, ref_x, atol=1e-4, rtol=1e-4)
    if router:
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(wt, ref_wt, atol=1e-5, rtol=1e-5)
    else:
        assert (idx == -1).all()  # untouched without a router


@pytest.mark.parametrize("d,dtype,programs,kind", [(37, torch.float32, 1, "rms"), (300, torch.bfloat16, 1, "rms"),
                                                   (256, torch.float32, 1, "rms"), (300, torch.bfloat16, 4, "rms"),
                                                   (300, torch.bfloat16, 2, "first"), (256, torch.float32, 8, "ln"),
                                                   (37, torch.float32, 4, "ln")])
def test_add_norm_writes_the_int4_input_planes_of_the_stored_x(d, dtype, programs, kind, device):
    """``x_planes``: the int4 input planes (per nibble position the stored x times its power of two, then the word
    sums) equal :func:`int4_x_planes` of the stored ``x`` (one tile below 128, 3 ragged tiles padded to 4, whole
    tiles), padding 0; ``x``, the residual and the routing as without them. Written by one program a row or shared
    by ``plane_programs`` of them (more than the tiles: one a tile); first layer (embedding gather) and LayerNorm
    too. A bad planes tensor is an error."""
    from qmamba.quant.layout import INT4_X_PLANES, int4_x_planes

    torch.manual_seed(d)
    batch, e, vocab = 2, 5, 7
    residual = torch.randn(batch, d, device=device)
    h = None if kind == "first" else torch.randn(batch, d, device=device)
    ids = torch.tensor([6, 1], device=device)
    emb = torch.randn(vocab, d, device=device)
    norm_w = (torch.rand(d, device=device) + 0.5).to(dtype)
    norm_b = torch.randn(d, device=device).to(dtype) if kind == "ln" else None
    rw, rb = torch.randn(e, d, device=device), torch.randn(e, device=device)
    want_r, want_x, want_idx, want_wt = add_norm_ref(residual.clone(), norm_w, 1e-5, h, ids, emb, norm_b, rw, rb)
    x = torch.empty(batch, d, device=device, dtype=dtype)
    kpad = {37: 128, 300: 512, 256: 256}[d]  # a power-of-two number of tiles
    planes = torch.full((batch, INT4_X_PLANES, kpad), float("nan"), device=device)
    idx = torch.full((batch,), -1, dtype=torch.int32, device=device)
    wt = torch.zeros(batch, device=device)
    res_in = residual.clone()
    res_out = torch.full_like(residual, float("nan")) if programs > 1 else None  # shared: read one, write another
    add_norm(x, residual, norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, norm_b=norm_b, router_w=rw, router_b=rb,
             expert_idx=idx, expert_weight=wt, x_planes=planes, plane_programs=programs, residual_out=res_out)
    torch.testing.assert_close(x.float(), want_x.to(dtype).float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(residual if res_out is None else res_out, want_r, atol=1e-5, rtol=1e-5)
    if res_out is not None:
        assert torch.equal(residual, res_in)  # only read
    assert torch.equal(idx, want_idx) or dtype != torch.float32  # bf16 x may flip a near tie
    assert (idx >= 0).all() and (wt > 0).all()
    want = int4_x_planes(x)
    torch.testing.assert_close(planes[:, :8], want[:, :8], atol=0, rtol=0)  # powers of two: exact
    torch.testing.assert_close(planes[:, 8], want[:, 8], atol=1e-20, rtol=1e-5)  # sums: order may differ
    assert torch.equal(planes[:, 8, kpad // 8:], torch.zeros_like(planes[:, 8, kpad // 8:]))
    with pytest.raises(ValueError, match="x_planes"):
        add_norm(x, residual, norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, x_planes=planes[:, :, :kpad - 1])
    with pytest.raises(ValueError, match="residual_out"):
        add_norm(x, residual, norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, residual_out=residual)


@pytest.mark.parametrize("d,dtype,kind", [(37, torch.float32, "rms"), (300, torch.bfloat16, "rms"),
                                           (256, torch.bfloat16, "first"), (300, torch.float32, "ln")])
def test_add_norm_quantizes_the_stored_x_to_int8(d, dtype, kind, device):
    """``x_int8``: the stored ``x`` quantized per row exactly as :func:`quantize_rows_int8_ref` quantizes it (codes in
    plane-byte order, the scale, the tile sums with their padding left zero), beside the planes and the routing,
    which stay as without it; a zero row (scale 1, codes 0) included. Bad buffers are an error."""
    from qmamba.kernels.w4a8_gemm import quantize_rows_int8_ref, sum_columns
    from qmamba.quant.layout import INT4_X_PLANES

    torch.manual_seed(d)
    batch, e, vocab = 3, 5, 7
    residual = torch.randn(batch, d, device=device)
    h = None if kind == "first" else torch.randn(batch, d, device=device)
    if h is not None:
        h[2] = -residual[2]  # a zero row
    ids = torch.tensor([6, 1, 0], device=device)
    emb = torch.randn(vocab, d, device=device)
    norm_w = (torch.rand(d, device=device) + 0.5).to(dtype)
    norm_b = torch.zeros(d, device=device).to(dtype) if kind == "ln" else None
    rw, rb = torch.randn(e, d, device=device), torch.randn(e, device=device)
    qpad = -(-d // 128) * 128
    codes = torch.full((batch, qpad), 99, dtype=torch.int8, device=device)
    scale = torch.full((batch,), float("nan"), device=device)
    sums = torch.zeros(batch, sum_columns(qpad), device=device)
    kpad = {37: 128, 300: 512, 256: 256}[d]
    planes = torch.full((batch, INT4_X_PLANES, kpad), float("nan"), device=device)
    outs = []
    for x_int8 in (None, (codes, scale, sums)):
        x = torch.empty(batch, d, device=device, dtype=dtype)
        idx = torch.full((batch,), -1, dtype=torch.int32, device=device)
        wt = torch.zeros(batch, device=device)
        add_norm(x, residual.clone(), norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, norm_b=norm_b, router_w=rw,
                 router_b=rb, expert_idx=idx, expert_weight=wt, x_planes=planes, x_int8=x_int8)
        outs.append((x, idx, wt, planes.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    want = quantize_rows_int8_ref(outs[1][0], qpad)
    assert torch.equal(codes, want[0]) and torch.equal(scale, want[1]) and torch.equal(sums, want[2])
    if h is not None:
        assert scale[2].item() == 1.0 and not codes[2].any()
    with pytest.raises(ValueError, match="int8"):
        add_norm(x, residual, norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, x_int8=(codes.float(), scale, sums))
    with pytest.raises(ValueError, match="sums"):
        add_norm(x, residual, norm_w, 1e-5, h=h, token_ids=ids, embedding=emb, x_int8=(codes, scale, sums[:, :1]))


def test_int4_x_planes_reference():
    """The reference planes against their definition: plane i is x * 2^(96 - 4 (i mod 5)), plane 8 at word 16 t + w
    is 2^-53 times the sum of x over k = 128 t + 16 i + w."""
    from qmamba.quant.layout import int4_x_planes

    x = torch.randn(3, 200)
    p = int4_x_planes(x)
    assert p.shape == (3, 9, 256) and int4_x_planes(torch.randn(1, 300)).shape == (1, 9, 512)
    assert torch.equal(p[:, 6, :200], x * 2.0 ** 92) and torch.equal(p[:, 3, 200:], torch.zeros(3, 56))
    xp = torch.nn.functional.pad(x, (0, 56))
    t, w = 1, 5
    want = sum(xp[:, 128 * t + 16 * i + w] for i in range(8)) * 2.0 ** -53
    torch.testing.assert_close(p[:, 8, 16 * t + w], want)
    assert torch.equal(p[:, 8, 32:], torch.zeros(3, 224))


@pytest.mark.parametrize("n_zero,programs", [(333, 1), (27904, 1), (27904, 4)])
def test_add_norm_zeroes_its_zero_buffer(n_zero, programs, device):
    """``zero``: the launch also zeroes a float32 buffer (the fused step's norm sums; with
    ``DecodePolicy.producer_word_sums`` their word-sum rows too: the programs in turn, 1,024-element blocks), and
    nothing beside it; the norm is as without it."""
    from qmamba.quant.layout import int4_x_planes

    torch.manual_seed(3)
    batch, d = 2, 300
    h, emb_ids = None, torch.tensor([1, 4], device=device)
    emb = torch.randn(6, d, device=device)
    w = torch.rand(d, device=device) + 0.5
    res, res_out = torch.zeros(batch, d, device=device), torch.zeros(batch, d, device=device)
    x = torch.empty(batch, d, device=device)
    planes = torch.zeros(batch, 9, 512, device=device)
    store = torch.full((n_zero + 100,), 7.0, device=device)
    add_norm(x, res, w, 1e-5, h=h, token_ids=emb_ids, embedding=emb, x_planes=planes, plane_programs=programs,
             residual_out=res_out if programs > 1 else None, zero=store[:n_zero])
    assert (store[:n_zero] == 0).all() and (store[n_zero:] == 7.0).all()
    _, want, _, _ = add_norm_ref(None, w, 1e-5, token_ids=emb_ids, embedding=emb)
    torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(planes, int4_x_planes(x), atol=1e-20, rtol=1e-5)


def test_add_norm_router_tie_takes_lowest_expert(device):
    d = 8
    residual = torch.randn(1, d, device=device)
    rw = torch.zeros(4, d, device=device)  # every logit equal
    idx = torch.full((1,), -1, dtype=torch.int32, device=device)
    wt = torch.zeros(1, device=device)
    add_norm(torch.empty(1, d, device=device), residual, torch.ones(d, device=device), 1e-5,
             h=torch.zeros(1, d, device=device), router_w=rw, expert_idx=idx, expert_weight=wt)
    assert idx.item() == 0 and abs(wt.item() - 0.5) < 1e-6


@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_add_norm_rows_matches_reference(has_residual, layernorm, out_dtype, device):
    """The prefill's add + norm over rows (functional: new residual and normed rows, the input residual untouched)
    against the reference model's expressions; ``None`` residual: the first layer (the residual is ``h``)."""
    g = torch.Generator().manual_seed(3)
    rows, d = 37, 100
    h = torch.randn(rows, d, generator=g).to(device)
    residual = torch.randn(rows, d, generator=g).to(device) if has_residual else None
    kept = residual.clone() if has_residual else None
    w = (torch.rand(d, generator=g) + 0.5).to(device)
    b = torch.randn(d, generator=g).to(device) if layernorm else None
    r, x = add_norm_rows(residual, h, w, 1e-5, b, out_dtype)
    r_ref, x_ref = add_norm_rows_ref(residual, h, w, 1e-5, b, out_dtype)
    assert r.dtype == torch.float32 and x.dtype == (out_dtype or w.dtype)
    torch.testing.assert_close(r, r_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.float(), x_ref.float(), **(dict(atol=2e-2, rtol=2e-2) if out_dtype else
                                                             dict(atol=1e-5, rtol=1e-5)))
    if has_residual:
        assert torch.equal(residual, kept)


def ssm_step_inputs(batch, di, r, n, device):
    """Random ``(dbc, dt_w, dt_bias, x, z, A, D_skip, ssm_state)`` of one SSM step (dt in its usual range)."""
    dbc = torch.randn(batch, r + 2 * n, device=device)
    dt_w = torch.randn(di, r, device=device) / r ** 0.5
    dt_bias = torch.empty(di, device=device).uniform_(-4, -2)
    x, z = torch.randn(batch, di, device=device), torch.randn(batch, di, device=device)
    A = -torch.rand(di, n, device=device) * 4
    D_skip = torch.randn(di, device=device)
    return dbc, dt_w, dt_bias, x, z, A, D_skip, torch.randn(batch, di, n, device=device)


@pytest.mark.parametrize("di,r,n,ready", [(24, 3, 16, False), (50, 5, 7, False), (50, 5, 7, True)])
def test_dt_state_update_matches_reference(di, r, n, ready, device):
    torch.manual_seed(1)
    batch = 2
    dbc, dt_w, dt_bias, x, z, A, D_skip, state = ssm_step_inputs(batch, di, r, n, device)
    ref_y, ref_h = dt_state_update_ref(dbc, dt_w, dt_bias, x, z, A, D_skip, state)
    y = torch.empty(batch, di, device=device)
    dt_state_update(dbc, dt_w, dt_bias, x, z, A, D_skip, state, y, inputs_ready=ready)
    torch.testing.assert_close(state, ref_h, atol=1e-5, rtol=1e-5)  # updated in place
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_d,batch,n", [(8, 2, 16), (32, 2, 16), (8, 8, 16), (16, 8, 7)])
def test_dt_state_update_channels_per_program(block_d, batch, n, device):
    """``block_d`` (``DecodePolicy.ssm_block_d``): any power of two gives the reference's update, with the conv step
    and a ragged last block (50 channels; on CUDA BlackMamba-2.8B's 2944, where 8 channels a program at batch 8 once
    raced: the in-place state stores of one thread overtook another's loads); other block sizes are refused."""
    from qmamba.kernels.causal_conv1d import causal_conv1d_update_ref

    torch.manual_seed(block_d + batch)
    di, r, width = (2944 if device.type == "cuda" else 50), 5, 4
    dbc, dt_w, dt_bias, x, z, A, D_skip, state = ssm_step_inputs(batch, di, r, n, device)
    conv_state, conv_w = torch.randn(batch, di, width, device=device), torch.randn(di, width, device=device)
    xc, ref_conv = causal_conv1d_update_ref(x, conv_state, conv_w, None, "silu")
    ref_y, ref_h = dt_state_update_ref(dbc, dt_w, dt_bias, xc, z, A, D_skip, state)
    y = torch.empty(batch, di, device=device)
    dt_state_update(dbc, dt_w, dt_bias, x, z, A, D_skip, state, y, conv=(conv_state, conv_w, None), block_d=block_d)
    torch.testing.assert_close(state, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state, ref_conv, atol=0, rtol=0)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        dt_state_update(dbc, dt_w, dt_bias, x, z, A, D_skip, state, y, block_d=12)


@pytest.mark.parametrize("has_bias,ready", [(True, False), (False, False), (True, True), (False, True)])
def test_dt_state_update_with_conv_step_matches_conv_then_update(has_bias, ready, device):
    """The conv variant: x is the conv input; the kernel applies the conv step and shifts the conv state in place.
    Checked against the independent conv-update reference followed by the plain update. ``ready``
    (``inputs_ready``, ``DecodePolicy.early_reads``): x, z and the states read before dbc, the same results."""
    from qmamba.kernels.causal_conv1d import causal_conv1d_update_ref

    torch.manual_seed(3)
    batch, di, r, n, width = 2, 40, 4, 8, 4
    dbc = torch.randn(batch, r + 2 * n, device=device)
    dt_w = torch.randn(di, r, device=device) / r ** 0.5
    dt_bias = torch.empty(di, device=device).uniform_(-4, -2)
    xz = torch.randn(batch, 2 * di, device=device)
    A = -torch.rand(di, n, device=device) * 4
    D_skip = torch.randn(di, device=device)
    state = torch.randn(batch, di, n, device=device)
    conv_state = torch.randn(batch, di, width, device=device)
    conv_w = torch.randn(di, width, device=device)
    conv_b = torch.randn(di, device=device) if has_bias else None
    xc, ref_conv = causal_conv1d_update_ref(xz[:, :di], conv_state, conv_w, conv_b, "silu")
    ref_y, ref_h = dt_state_update_ref(dbc, dt_w, dt_bias, xc, xz[:, di:], A, D_skip, state)
    twin_y, twin_h, twin_conv = dt_state_update_ref(dbc, dt_w, dt_bias, xz[:, :di], xz[:, di:], A, D_skip, state,
                                                    conv=(conv_state, conv_w, conv_b))
    torch.testing.assert_close(twin_y, ref_y)
    torch.testing.assert_close(twin_conv, ref_conv)
    y = torch.empty(batch, di, device=device)
    dt_state_update(dbc, dt_w, dt_bias, xz[:, :di], xz[:, di:], A, D_skip, state, y,
                    conv=(conv_state, conv_w, conv_b), inputs_ready=ready)
    torch.testing.assert_close(state, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state, ref_conv, atol=0, rtol=0)  # the window is shifted exactly
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("word_sums", [False, True])
def test_dt_state_update_writes_the_input_planes_of_y(word_sums, device):
    """``y_planes``: planes 0..7 receive the int4 input planes of ``y_out`` as stored (out_proj's input), plane 8
    and the padding columns are left alone; y and the state as without them. ``y_word_sums``
    (``DecodePolicy.producer_word_sums``): the planes' word sums, added over the programs into a zeroed row, equal
    plane 8 of :func:`int4_x_planes` of y."""
    from qmamba.quant.layout import int4_x_planes

    torch.manual_seed(5)
    batch, di, r, n = 2, 150, 6, 16
    dbc = torch.randn(batch, r + 2 * n, device=device)
    dt_w, dt_b = torch.randn(di, r, device=device) * 0.3, torch.randn(di, device=device)
    x, z = torch.randn(batch, di, device=device), torch.randn(batch, di, device=device)
    A, D = -torch.rand(di, n, device=device) - 0.5, torch.randn(di, device=device)
    state = torch.randn(batch, di, n, device=device)
    want_y, want_h = dt_state_update_ref(dbc, dt_w, dt_b, x, z, A, D, state)
    y = torch.empty(batch, di, device=device, dtype=torch.bfloat16)
    planes = torch.zeros(batch, 9, 256, device=device)
    planes[:, 8] = 7.0
    sums = torch.zeros(batch, 32, device=device) if word_sums else None
    dt_state_update(dbc, dt_w, dt_b, x, z, A, D, state, y, y_planes=planes, y_word_sums=sums)
    torch.testing.assert_close(y.float(), want_y, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state, want_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(planes[:, :8], int4_x_planes(y)[:, :8], atol=0, rtol=0)
    assert (planes[:, 8] == 7.0).all()
    if word_sums:
        torch.testing.assert_close(sums, int4_x_planes(y)[:, 8, :32], atol=1e-22, rtol=1e-5)
        with pytest.raises(ValueError, match="y_word_sums"):
            dt_state_update(dbc, dt_w, dt_b, x, z, A, D, state, y, y_planes=planes, y_word_sums=sums[:, :16])
    with pytest.raises(ValueError, match="y_planes"):
        dt_state_update(dbc, dt_w, dt_b, x, z, A, D, state, y, y_planes=planes[:, :8])


def test_aligned_rows_pads_the_stride_and_keeps_the_values(device):
    """``aligned_rows``: the same values with a row stride that is a multiple of 16 elements (zeros past them); a
    tensor whose rows already are is returned itself (no copy)."""
    w = torch.randn(7, 92, device=device).to(torch.bfloat16)
    a = aligned_rows(w)
    assert a.shape == w.shape and a.stride() == (96, 1) and a.dtype == w.dtype
    torch.testing.assert_close(a, w, atol=0, rtol=0)
    assert (a.as_strided((7, 96), (96, 1))[:, 92:] == 0).all()
    ok = torch.randn(5, 48, device=device)
    assert aligned_rows(ok) is ok
    assert aligned_rows(ok.t().contiguous().t()).stride() == (48, 1)  # column-major: copied into aligned rows
    with pytest.raises(ValueError, match="2-D"):
        aligned_rows(torch.zeros(3, device=device))


@pytest.mark.parametrize("batch,block_d", [(1, 8), (3, 32)])
def test_dt_state_update_with_aligned_dt_rows(batch, block_d, device):
    """The SSM update on a dt_proj weight read through ``aligned_rows`` (BlackMamba-2.8B's rank 92 -> stride 96:
    ``DecodePolicy.dt_rows_aligned``, the fused step's default) gives the reference's update, with the conv step."""
    from qmamba.kernels.causal_conv1d import causal_conv1d_update_ref

    torch.manual_seed(7 + batch)
    di, r, n, width = 72, 92, 16, 4
    dbc, dt_w, dt_bias, x, z, A, D_skip, state = ssm_step_inputs(batch, di, r, n, device)
    conv_state, conv_w = torch.randn(batch, di, width, device=device), torch.randn(di, width, device=device)
    xc, ref_conv = causal_conv1d_update_ref(x, conv_state, conv_w, None, "silu")
    ref_y, ref_h = dt_state_update_ref(dbc, dt_w, dt_bias, xc, z, A, D_skip, state)
    y = torch.empty(batch, di, device=device)
    dt_w = aligned_rows(dt_w)
    assert dt_w.stride(0) == 96
    dt_state_update(dbc, dt_w, dt_bias, x, z, A, D_skip, state, y, conv=(conv_state, conv_w, None), block_d=block_d)
    torch.testing.assert_close(state, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state, ref_conv, atol=0, rtol=0)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)


def test_dt_state_update_rejects_strided_state(device):
    state = torch.zeros(1, 16, 8, device=device).transpose(1, 2)
    with pytest.raises(ValueError, match="ssm_state"):
        dt_state_update(torch.zeros(1, 2 + 16, device=device), torch.zeros(8, 2, device=device),
                        torch.zeros(8, device=device), torch.zeros(1, 8, device=device),
                        torch.zeros(1, 8, device=device), torch.zeros(8, 8, device=device),
                        torch.zeros(8, device=device), state, torch.zeros(1, 8, device=device))
