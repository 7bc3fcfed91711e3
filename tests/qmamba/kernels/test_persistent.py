"""qmamba.kernels.persistent: recorded launches replayed as one persistent launch compute what the launches compute
(the launches themselves are the reference; on CPU the chain runs one program through the interpreter)."""

import pytest
import torch

from qmamba.kernels import persistent as P
from qmamba.kernels.fused_moe import gated_act, gated_act_ref
from qmamba.kernels.decode_linear import DecodePolicy, decode_linear
from qmamba.kernels.decode_step import add_norm
from qmamba.quant.formats import Int4Format


def _int4(n, k, seed, experts=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*((experts,) if experts else ()), n, k, generator=g) / k ** 0.5
    fmt = Int4Format(32)
    return fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)


def _chain_of_three(device, x, res, norm_w, w1, w2, experts, idx, rwt, h1, out, policy):
    """add + norm with the router, then a dense int4 GEMV on its output, then a routed one on that (fc1 -> fc2's
    shape of data flow)."""
    add_norm(x, res, norm_w, 1e-5, h=h1, router_w=experts, expert_idx=idx, expert_weight=rwt)
    decode_linear(x, w1, h1, policy=policy)
    decode_linear(h1, w2, out, row_expert=idx, row_scale=rwt, policy=policy)


def test_chain_of_recorded_launches_computes_what_the_launches_compute(device):
    torch.manual_seed(0)
    d, n = 64, 64
    policy = DecodePolicy.for_device(device)
    w1, w2 = _int4(d, d, 1, device=device), _int4(n, d, 2, experts=4, device=device)
    router = torch.randn(4, d, device=device)
    norm_w = torch.rand(d, device=device) + 0.5

    def buffers():
        return dict(x=torch.empty(2, d, device=device), res=torch.randn(2, d, device=device),
                    h1=torch.randn(2, d, device=device), out=torch.empty(2, n, device=device),
                    idx=torch.empty(2, dtype=torch.int32, device=device), rwt=torch.empty(2, device=device))
    want, got = buffers(), buffers()
    got["res"].copy_(want["res"])
    got["h1"].copy_(want["h1"])
    got["out"].fill_(float("nan"))
    _chain_of_three(device, want["x"], want["res"], norm_w, w1, w2, router, want["idx"], want["rwt"], want["h1"],
                    want["out"], policy)
    with P.recording() as launches:
        _chain_of_three(device, got["x"], got["res"], norm_w, w1, w2, router, got["idx"], got["rwt"], got["h1"],
                        got["out"], policy)
    assert [launch.kernel for launch in launches] == ["add_norm", "decode_linear", "decode_linear"]
    assert got["out"].isnan().all()  # nothing ran while recording
    chain = P.PersistentChain(launches, device)
    chain()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    # a second run starts from the new residual: compare with the launches run once more
    _chain_of_three(device, want["x"], want["res"], norm_w, w1, w2, router, want["idx"], want["rwt"], want["h1"],
                    want["out"], policy)
    chain()
    torch.testing.assert_close(got["out"], want["out"], rtol=0, atol=0)


def test_recording_refuses_other_kernels_and_restores_them(device):
    h = torch.randn(2, 16, device=device)
    out = torch.empty(2, 8, device=device)
    with pytest.raises(P.UnsupportedLaunch, match="no registered body"):
        with P.recording():
            gated_act(h, "silu", True, out=out)
    gated_act(h, "silu", True, out=out)  # launches again outside
    torch.testing.assert_close(out, gated_act_ref(h, "silu", True), atol=1e-5, rtol=1e-5)
    from qmamba.kernels import decode_linear as dl

    assert not isinstance(dl._decode_linear_kernel, P._Recorder)


def test_launches_of_one_shape_share_a_kind_and_the_table_holds_what_differs():
    policy = DecodePolicy.for_device(torch.device("cpu"))
    ws = [_int4(32, 64, seed) for seed in range(3)]
    x = torch.randn(1, 64)
    outs = [torch.empty(1, 32) for _ in ws]
    with P.recording() as launches:
        for w, out in zip(ws, outs):
            decode_linear(x, w, out, policy=policy)
    chain = P.PersistentChain(launches, "cpu", prefetch=True)
    assert len(chain.kinds) == 1 and len(chain.launches) == 3
    kind = chain.kinds[0]
    # the weights and outputs differ: table columns; x, the shapes and strides are the same: also columns for
    # tensors (addresses), constants in the source for integers
    assert {"w_ptr", "s_ptr", "z_ptr", "out_ptr", "x_ptr"} <= set(kind.slots)
    assert "N" not in kind.slots and "K" not in kind.slots
    table = chain.table
    for row, w, out in zip(table, ws, outs):
        assert row[kind.slots["w_ptr"]] == w.qweight.data_ptr() and row[kind.slots["out_ptr"]] == out.data_ptr()
    # each row carries the next launch's weight ranges (the last none)
    col = P._HEAD + chain.args_width
    for i in range(2):
        assert table[i, col] == ws[i + 1].qweight.data_ptr()
        nbytes = ws[i + 1].qweight.numel() * ws[i + 1].qweight.element_size() // 16 * 16
        assert table[i, col + 1] == nbytes
        assert table[i, col + 2] == -(-nbytes // (chain.programs * 16)) * 16  # a program's chunk
    assert (table[2, col:] == 0).all()
    assert "def kind_0(t, g1, g2, row)" in chain.source and "prefetch_share" in chain.source


def test_routed_prefetch_ranges_take_the_routed_experts_slice():
    policy = DecodePolicy.for_device(torch.device("cpu"))
    w = _int4(32, 64, 0, experts=4)
    idx = torch.tensor([2], dtype=torch.int32)
    x, out = torch.randn(1, 64), torch.empty(1, 32)
    with P.recording() as launches:
        decode_linear(x, w, out, row_expert=idx, policy=policy)
    (base, nbytes, idx_addr, stride), *_ = P._prefetch_ranges(launches[0])
    q = w.qweight
    assert (base, idx_addr) == (q.data_ptr(), idx.data_ptr())
    assert stride == q.stride(0) * q.element_size() and nbytes == stride // 16 * 16


def test_an_expert_slice_is_not_asked_for_before_its_router_ran():
    """fc1 after the router's add + norm: its expert is not known while the add + norm runs (no range); fc2 after
    fc1: the slice of the routed expert."""
    policy = DecodePolicy.for_device(torch.device("cpu"))
    d = 64
    fc1, fc2 = _int4(2 * d, d, 0, experts=4), _int4(d, d, 1, experts=4)
    idx, rwt = torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    x, h = torch.empty(1, d), torch.randn(1, d)
    act, res, norm_w, router, out = torch.empty(1, d), torch.randn(1, d), torch.ones(d), torch.randn(4, d), \
        torch.empty(1, d)
    with P.recording() as launches:
        add_norm(x, res, norm_w, 1e-5, h=h, router_w=router, expert_idx=idx, expert_weight=rwt)
        decode_linear(x, fc1, act, row_expert=idx, gated="silu", policy=policy)
        decode_linear(act, fc2, out, row_expert=idx, row_scale=rwt, policy=policy)
    chain = P.PersistentChain(launches, "cpu", prefetch=True)
    col = P._HEAD + chain.args_width
    assert (chain.table[0, col:] == 0).all()  # fc1's expert: unknown during the router's launch
    assert chain.table[1, col] == fc2.qweight.data_ptr() and chain.table[1, col + 3] == idx.data_ptr()


def test_a_barrier_that_never_opens_times_out_instead_of_hanging(device):
    """A program that polls MAX_SPINS times marks the counter (TIMED_OUT) and goes on: every later barrier opens."""
    import triton

    @triton.jit
    def waits_twice(counter_ptr):
        P.grid_wait(counter_ptr, 5, 3)   # nobody else arrives: times out
        P.grid_wait(counter_ptr, 9, 3)   # opens at once: the counter is past any target now

    counter = torch.zeros(1, dtype=torch.int32, device=device)
    waits_twice[(1,)](counter)
    assert int(counter.item()) == P.TIMED_OUT


def test_pytorch_work_inside_a_recording_is_refused():
    """An op that computes would run once while recording and never in the replay: refused; views, metadata and
    allocations pass."""
    x = torch.randn(4, 8)
    with P.recording():
        view = x[:, :4]
        fresh = torch.empty(3)
        assert view.shape == (4, 4) and fresh.numel() == 3 and x.stride() == (8, 1)
        with pytest.raises(P.UnsupportedLaunch, match="would not be replayed"):
            x.zero_()
        with pytest.raises(P.UnsupportedLaunch, match="would not be replayed"):
            x + 1
    assert torch.isfinite(x + 1).all()  # outside, PyTorch computes again


def test_prefetch_ranges_read_the_tables_columns(device):
    """The kernel side of the prefetch columns: thread t gets range t (start moved to the routed expert's slice;
    a -1 index reads as expert 0), the slots past the ranges zero."""
    import triton
    import triton.language as tl

    @triton.jit
    def read(cols_ptr, out_ptr, RANGES: tl.constexpr, NT: tl.constexpr):
        base, nbytes, chunk = P.prefetch_ranges(cols_ptr, RANGES, NT)
        t = tl.arange(0, NT)
        tl.store(out_ptr + t * 3, base)
        tl.store(out_ptr + t * 3 + 1, nbytes)
        tl.store(out_ptr + t * 3 + 2, chunk)

    idx = torch.tensor([3], dtype=torch.int32, device=device)
    stray = torch.tensor([-1], dtype=torch.int32, device=device)
    cols = torch.tensor([4096, 640, 160, 0, 0,                        # a dense range
                         8192, 512, 128, idx.data_ptr(), 1024,        # a routed one: expert 3's slice
                         16384, 512, 128, stray.data_ptr(), 1024],    # no expert yet: expert 0
                        dtype=torch.int64, device=device)
    out = torch.full((32, 3), -7, dtype=torch.int64, device=device)
    read[(1,)](cols, out, RANGES=3, NT=32, num_warps=1)
    assert out[:3].tolist() == [[4096, 640, 160], [8192 + 3 * 1024, 512, 128], [16384, 512, 128]]
    assert (out[3:] == 0).all()
