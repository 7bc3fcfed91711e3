"""The decode linear kernel (whole rows per program, PDL-ready) against its twin and the twin against independent
pieces (x @ dequantized W, the conv-update reference, the gated activation): float, int8, int4 (group 32 / 128,
symmetric), 1-bit signs (Bi-Mamba form), ragged K (1472-like tails), 1..8 rows, routed experts (some idle), conv
epilogue, gated epilogue."""

import dataclasses

import pytest
import torch

from qmamba.kernels.causal_conv1d import causal_conv1d_update_ref
from qmamba.kernels.decode_linear import (NormIn, NormOut, binary_denorm_of, decode_linear, decode_linear_ref,
                                          norm_out_ref)
from qmamba.kernels.decode_policy import DecodePolicy
from qmamba.kernels.fused_moe import gated_act_ref
from qmamba.kernels.quant_matmul import dequant_matmul_ref
from qmamba.kernels.binary_matmul import binary_matmul_ref
from qmamba.kernels.weights import FMT_BINARY, BinaryWeight, PackedWeight
from qmamba.quant.formats import BinaryFormat, Int4Format, Int8Format
from qmamba.quant.layout import binary_denorm_vectors

FORMATS = {"float": None, "int8": Int8Format(), "int4g32": Int4Format(32), "int4g128": Int4Format(128),
           "int4sym": Int4Format(64, symmetric=True), "planes128": Int4Format(128), "planes256": Int4Format(256)}


def make_weight(fmt, n, k, device, experts=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (experts,) if experts else ()
    w = torch.randn(*lead, n, k, generator=g) / k ** 0.5
    if fmt is None:
        return PackedWeight.from_float(w.to(device))
    return fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)


def weight_for(name, n, k, device, experts=None, seed=0):
    """``make_weight`` by FORMATS key (or "binary": 1-bit signs with per-column alpha / beta, K a multiple of 32);
    the ``planes*`` keys are int4 weights converted to plane words."""
    w = make_weight(BinaryFormat() if name == "binary" else FORMATS[name], n, k, device, experts, seed)
    return w.to_planes() if name.startswith("planes") else w


def matmul_ref(x, w, bias=None, **kw):
    """An independent twin of ``x @ W_hat^T``: the general kernels' reference, or the factored 1-bit form."""
    return (binary_matmul_ref if isinstance(w, BinaryWeight) else dequant_matmul_ref)(x, w, bias, **kw)


def poisoned(m, n, device):
    return torch.full((m, n), float("nan"), device=device)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("block,unpack", [(None, "shift"), (4, "shift"), (4, "magic"), (4, "denorm"),
                                          (2, "denorm-2warps")])
def test_dense_matches_dequantized_matmul(fmt, m, block, unpack, device):
    """``block``: rows per program (None: the device's policy; 4: several programs and a ragged last one);
    ``unpack``: int4 nibbles shifted down, masked in place against a pre-scaled input ("magic"), or masked in place
    and read as subnormal floats ("denorm"); "-2warps": programs of 2 warps (4 elsewhere on CUDA), so that a weight
    row's tiles span a different share of the program's threads."""
    torch.manual_seed(m)
    n, k = 37, 200 if not fmt.startswith("planes") else 300  # K not a multiple of any group: padded tail
    w = weight_for(fmt, n, k, device)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device)
    policy = None if block is None else DecodePolicy(pdl=False, block_n_int4=block, block_n_float=block,
                                                     num_warps=(2 if unpack.endswith("-2warps") else 4)
                                                     if device.type == "cuda" else 1,
                                                     int4_unpack=unpack.split("-")[0])
    out = decode_linear(x, w, poisoned(m, n, device), bias=bias, policy=policy)
    ref = decode_linear_ref(x, w, bias=bias)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the twin is x @ W_hat^T + b
    torch.testing.assert_close(ref, dequant_matmul_ref(x, w, bias).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["planes128", "int4g32", "int4sym"])
@pytest.mark.parametrize("gated", [False, True])
def test_denorm_input_read_in_the_tile_shape(fmt, gated, device):
    """``DecodePolicy.int4_x_in_tile``: one row, "denorm" codes, the input of the codes read in the tile's
    [rows, tiles, words] shape (the launcher's UNPACK 3 wherever a tile row is narrow, as these are): the same
    result as the dequantized matmul, dense and as a routed gated expert (ragged K, padded tiles)."""
    torch.manual_seed(7)
    policy = DecodePolicy(pdl=False, block_n_int4=4, num_warps=4 if device.type == "cuda" else 1,
                          int4_unpack="denorm", int4_x_in_tile=True)
    n, k = (48, 300) if fmt.startswith("planes") else (40, 200)
    x = torch.randn(1, k, device=device)
    if not gated:
        w = weight_for(fmt, n, k, device)
        out = decode_linear(x, w, poisoned(1, n, device), policy=policy)
        torch.testing.assert_close(out, dequant_matmul_ref(x, w).float(), atol=1e-4, rtol=1e-4)
        return
    w = weight_for(fmt, 2 * n, k, device, experts=3, seed=3)
    idx = torch.tensor([2], dtype=torch.int32, device=device)
    act = decode_linear(x, w, poisoned(1, n, device), row_expert=idx, gated="gelu", policy=policy)
    torch.testing.assert_close(act, gated_act_ref(dequant_matmul_ref(x, w, row_expert=idx), "gelu", True).float(),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["planes128", "planes256"])
@pytest.mark.parametrize("x_in_tile", [True, False])
@pytest.mark.parametrize("case", ["dense", "conv", "gated", "row_scale", "dense-nosums", "row_scale-nosums"])
@pytest.mark.parametrize("mode", ["plain", "pieces", "pieces-joint", "pieces-joint-wsums", "pieces-jointng-wsums"])
def test_input_planes_match_the_dequantized_matmul(fmt, x_in_tile, case, mode, device):
    """``x_planes`` (the int4 input planes add + norm writes, :func:`int4_x_planes`): one row, "denorm" plane
    words, the input read from the planes in the tile's shape (UNPACK 3) or broadcast over the rows (2): dense with a
    bias and a ragged last program, in_proj's conv epilogue, a routed gated expert and fc2's routing weight, against
    the dequantized matmul of x (ragged K: padded tiles; group 256: two tiles a scale). A planes tensor of the wrong
    shape is an error. "-nosums": plane 8 (the word sums) unwritten (NaN), ``x_plane_sums=False``: summed in the
    kernel. The gated case also writes the input planes of its output (``out_planes``, fc1 for fc2). "pieces"
    (``DecodePolicy.int4_tile_pieces``): K 700, 6 tiles read as 4 + 2 (group 256: the second piece's scale blocks
    start at block 2); "-joint" (``DecodePolicy.planes_joint``): every product (gate and up from one read of the
    input) before any reduction, the word sums read in the tile's shape; "-wsums"
    (``DecodePolicy.producer_word_sums``): the word sums given as a row of their own (``x_word_sums``; plane 8 NaN),
    and the gated case adds its output planes' word sums into ``out_word_sums``; "-jointng": joint but for the gated
    stack (``DecodePolicy.planes_joint_gated`` off: its word sums given, its products reduced piece by piece)."""
    from qmamba.quant.layout import int4_x_planes

    torch.manual_seed(11)
    policy = DecodePolicy(pdl=False, block_n_int4=4, num_warps=4 if device.type == "cuda" else 1,
                          int4_unpack="denorm", int4_x_in_tile=x_in_tile, int4_tile_pieces=mode != "plain",
                          planes_joint="joint" in mode, planes_joint_gated="jointng" not in mode)
    wsums = mode.endswith("wsums")
    n, k = 45, 300 if mode == "plain" else 700
    x = torch.randn(1, k, device=device).to(torch.bfloat16).float()
    planes = int4_x_planes(x)
    kw = {}
    if wsums:  # the word sums in a row of their own; plane 8 unread
        kw["x_word_sums"] = planes[:, 8, :planes.shape[-1] // 8].clone()
        planes[:, 8] = float("nan")
    sums = not case.endswith("-nosums")
    case = case.split("-")[0]
    if not sums:
        planes[:, 8] = float("nan")
    kw.update(x_planes=planes, x_plane_sums=sums)
    if case in ("dense", "conv"):
        w = weight_for(fmt, n, k, device, seed=2)
        bias = torch.randn(n, device=device) if case == "dense" else None
        out, conv = poisoned(1, n, device), None
        if case == "conv":
            di, width = 29, 4
            state = torch.randn(1, di, width, device=device)
            conv_w, conv_b = torch.randn(di, width, device=device), torch.randn(di, device=device)
            conv = (state, conv_w, conv_b, poisoned(1, di, device))
        decode_linear(torch.full_like(x, float("nan")), w, out, bias=bias, conv_out=conv, policy=policy,
                      **kw)  # x itself is not read (here and below: NaN)
        torch.testing.assert_close(out, dequant_matmul_ref(x, w, bias).float(), atol=1e-4, rtol=1e-4)
        if conv is not None:
            want, _ = causal_conv1d_update_ref(out[:, :di], state, conv_w, conv_b, "silu")
            torch.testing.assert_close(conv[3], want.float(), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="x_planes"):
            decode_linear(x, w, out, policy=policy, x_planes=planes[:, :8])
        return
    idx = torch.tensor([1], dtype=torch.int32, device=device)
    if case == "gated":
        w = weight_for(fmt, 2 * n, k, device, experts=3, seed=3)
        out_planes = torch.zeros(1, 9, 128, device=device)
        out_sums = torch.zeros(1, 16, device=device) if wsums else None
        act = decode_linear(torch.full_like(x, float("nan")), w, poisoned(1, n, device), row_expert=idx, gated="silu",
                            policy=policy, out_planes=out_planes, out_word_sums=out_sums, **kw)
        want = gated_act_ref(dequant_matmul_ref(x, w, row_expert=idx), "silu", True).float()
        torch.testing.assert_close(act, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out_planes[:, :8], int4_x_planes(act)[:, :8], atol=0, rtol=0)  # as stored
        if wsums:
            torch.testing.assert_close(out_sums, int4_x_planes(act)[:, 8, :16], atol=1e-22, rtol=1e-5)
        assert torch.equal(out_planes[:, 8], torch.zeros_like(out_planes[:, 8]))  # the sums are not written
        with pytest.raises(ValueError, match="out_planes"):
            decode_linear(x, w, poisoned(1, n, device), row_expert=idx, gated="silu", policy=policy,
                          out_planes=out_planes[:, :, :64])
        return
    w = weight_for(fmt, n, k, device, experts=3, seed=4)
    out = decode_linear(torch.full_like(x, float("nan")), w, poisoned(1, n, device), row_expert=idx,
                        row_scale=torch.tensor([0.75], device=device), policy=policy, expert_ready=True, **kw)
    torch.testing.assert_close(out, dequant_matmul_ref(x, w, row_expert=idx).float() * 0.75, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sums", [True, False])
@pytest.mark.parametrize("pieces,joint", [(False, False), (True, False), (True, True)])
def test_input_in_tile_shape_on_a_wide_tile_row(sums, pieces, joint, device):
    """``int4_x_in_tile_wide``: the input planes read in the tile's shape where a weight row's tiles cover the
    program's threads (K 1100: 9 tiles padded to 16, 256 words; ``pieces``: 8 + 1), as out_proj / fc2 would (their
    word sums summed in the kernel: ``x_plane_sums=False``), against the dequantized matmul."""
    from qmamba.quant.layout import int4_x_planes

    torch.manual_seed(12)
    warps = 4 if device.type == "cuda" else 1
    policy = DecodePolicy(pdl=False, block_n_int4=4, num_warps=warps, int4_unpack="denorm", int4_x_in_tile=True,
                          int4_x_in_tile_wide="always", int4_tile_pieces=pieces, planes_joint=joint)
    n, k = 37, 1100
    x = torch.randn(1, k, device=device).to(torch.bfloat16).float()
    planes = int4_x_planes(x)
    if not sums:
        planes[:, 8] = float("nan")
    w = weight_for("planes128", n, k, device, seed=6)
    out = decode_linear(torch.full_like(x, float("nan")), w, poisoned(1, n, device), policy=policy, x_planes=planes,
                        x_plane_sums=sums)
    torch.testing.assert_close(out, dequant_matmul_ref(x, w).float(), atol=1e-4, rtol=1e-4)


def test_input_in_tile_shape_only_where_the_tile_row_is_narrow(monkeypatch):
    """The launch rule of ``int4_x_in_tile`` at BlackMamba-2.8B's K with the CUDA policy's 4 warps: in_proj / fc1
    (K 1472: 16 tiles of 16 words, fewer than 4 x 32 threads x 4) read the input in the tile's shape (UNPACK 3);
    out_proj (K 2944, 32 tiles) keeps the broadcast (2) unless ``int4_x_in_tile_wide`` is "always" (the CUDA
    policy's since session 33), or "row_programs" and the rows are a batch's routed row programs (fc2 at batch 8); so
    does every matrix without the flag, or at two rows of one program."""
    import qmamba.kernels.decode_linear as dl

    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(meta["UNPACK"])

    monkeypatch.setattr(dl, "_decode_linear_kernel", Recorder())
    cuda = dl.DecodePolicy.cuda(132, False)
    assert cuda.int4_x_in_tile_wide == "always"
    for k, flag, m, want, wide, routed in (
            (1472, True, 1, 3, "off", False), (2944, True, 1, 2, "off", False), (1472, False, 1, 2, "off", False),
            (1472, True, 2, 2, "off", False), (2944, True, 1, 3, "always", False), (2944, True, 2, 2, "always", False),
            (2944, True, 1, 2, "row_programs", False), (2944, True, 1, 2, "row_programs", True),
            (2944, True, 8, 3, "row_programs", True), (2944, True, 8, 2, "off", True)):
        experts = 3 if routed else 1
        w = weight_for("planes128", 8, k, torch.device("cpu"), experts=experts)
        policy = dataclasses.replace(cuda, int4_x_in_tile=flag, planes_mma=False, max_rows_planes=2,
                                     int4_x_in_tile_wide=wide)
        kw = dict(row_expert=torch.zeros(m, dtype=torch.int32)) if routed else {}
        decode_linear(torch.randn(m, k), w, torch.empty(m, 8), policy=policy, **kw)
        assert seen[-1] == want, (k, flag, m, wide, routed)
    with pytest.raises(ValueError, match="int4_x_in_tile_wide"):
        dataclasses.replace(cuda, int4_x_in_tile_wide=True)


def test_tile_pieces_launch_rule(monkeypatch):
    """``int4_tile_pieces``: a row of tiles that is not a power of two is read as two power-of-two pieces where
    they pad less (BlackMamba-2.8B: K 1472, 12 tiles: 8 + 4; K 2944, 23: 16 + 8; K 3872, 31: 32 in one piece),
    and only where the kernel reads input planes in the tile's shape (one row: out_proj's input is broadcast unless
    ``int4_x_in_tile_wide`` is "always"); the flag off, or no planes, one padded piece. On in the CUDA policy."""
    import qmamba.kernels.decode_linear as dl
    from qmamba.quant.layout import int4_x_planes

    assert [dl.tile_pieces(t) for t in (1, 2, 3, 6, 8, 9, 12, 23, 31, 32)] == \
        [(1, 0), (2, 0), (2, 1), (4, 2), (8, 0), (8, 1), (8, 4), (16, 8), (32, 0), (32, 0)]
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((meta["NBP"], meta["NBP2"]))

    monkeypatch.setattr(dl, "_decode_linear_kernel", Recorder())
    cuda = dl.DecodePolicy.cuda(132, False)
    assert cuda.int4_tile_pieces
    for k, flag, planes, wide, want in ((1472, True, True, "off", (8, 4)), (2944, True, True, "off", (32, 0)),
                                        (2944, True, True, "always", (16, 8)), (3872, True, True, "always", (32, 0)),
                                        (1472, False, True, "off", (16, 0)), (1472, True, False, "off", (16, 0))):
        w = weight_for("planes128", 8, k, torch.device("cpu"))
        x = torch.randn(1, k)
        kw = dict(x_planes=int4_x_planes(x)) if planes else {}
        policy = dataclasses.replace(cuda, int4_tile_pieces=flag, int4_x_in_tile_wide=wide)
        decode_linear(x, w, torch.empty(1, 8), policy=policy, **kw)
        assert seen[-1] == want, (k, flag, planes, wide)


@pytest.mark.parametrize("m", [3, 8])
@pytest.mark.parametrize("unpack", ["shift", "denorm"])
def test_planes_on_cuda_cores_at_several_rows(m, unpack, device):
    """Plane words at 2+ rows without tensor cores (``planes_mma=False``): each code unpacked once for all rows."""
    torch.manual_seed(m)
    n, k = 37, 300
    w = weight_for("planes128", n, k, device)
    x = torch.randn(m, k, device=device)
    policy = DecodePolicy(pdl=False, block_n_int4=4, num_warps=4 if device.type == "cuda" else 1, planes_mma=False,
                          int4_unpack=unpack)
    out = decode_linear(x, w, poisoned(m, n, device), policy=policy)
    torch.testing.assert_close(out, decode_linear_ref(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4g32", "int4g32-magic", "planes128-magic", "planes128-denorm",
                                 "planes128-nomma", "binary", "binary-denorm", "float-rowprog", "planes128-rowprog",
                                 "binary-rowprog"])
@pytest.mark.parametrize("m", [1, 4])
def test_routed_gated_and_row_scale(fmt, m, device):
    """fc1 of a gated MoE (act(gate) * up of each row's expert) and fc2 with the routing weight; expert 2 idle.
    "-rowprog": one program row per input row (``DecodePolicy.routed_row_programs``; int4 as the CUDA policy
    reads it: "denorm" codes, the input in the tile's shape), expert 3 read by two of them."""
    torch.manual_seed(1)
    e, f, d = 4, 24, 96
    policy = DecodePolicy.for_device(device)
    if fmt.endswith("-rowprog"):
        fmt = fmt[:-8]
        policy = dataclasses.replace(policy, routed_row_programs=True, int4_unpack="denorm", int4_x_in_tile=True,
                                     block_n_int4=4)
    if fmt.endswith(("-magic", "-denorm")):
        fmt, unpack = fmt.split("-")
        policy = DecodePolicy(pdl=policy.pdl, num_warps=policy.num_warps, int4_unpack=unpack,
                              block_n_int4=policy.block_n_int4)
    if fmt.endswith("-nomma"):  # several routed rows on plane words, row by row on CUDA cores
        fmt, policy = fmt[:-6], DecodePolicy(pdl=policy.pdl, num_warps=policy.num_warps, planes_mma=False,
                                             block_n_int4=policy.block_n_int4)
    if fmt.startswith("planes"):
        f, d = 136, 264  # planes tile 128 elements: ragged K on both layers
    if fmt == "binary":
        f, d = 96, 160  # K a multiple of 32 on both layers (5 and 3 sign words: padded word tiles)
    fc1 = weight_for(fmt, 2 * f, d, device, experts=e, seed=1)
    fc2 = weight_for(fmt, d, f, device, experts=e, seed=2)
    x = torch.randn(m, d, device=device)
    idx = torch.tensor([3, 0, 3, 1][:m], dtype=torch.int32, device=device)
    rw = torch.rand(m, device=device) + 0.5
    act = decode_linear(x, fc1, poisoned(m, f, device), row_expert=idx, gated="silu", policy=policy)
    ref_act = decode_linear_ref(x, fc1, row_expert=idx, gated="silu")
    torch.testing.assert_close(act, ref_act, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref_act, gated_act_ref(matmul_ref(x, fc1, row_expert=idx), "silu", True),
                               atol=1e-5, rtol=1e-5)
    # fc2 as the fused step launches it: the expert's tile read before the wait (with PDL, on the GPU)
    y = decode_linear(act, fc2, poisoned(m, d, device), row_expert=idx, row_scale=rw, policy=policy,
                      expert_ready=True)
    torch.testing.assert_close(y, decode_linear_ref(act, fc2, row_expert=idx, row_scale=rw), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, matmul_ref(act, fc2, row_expert=idx, row_scale=rw).float(), atol=1e-4, rtol=1e-4)


def test_bad_shapes_are_errors(device):
    w = make_weight(FORMATS["int4g32"], 8, 64, device)
    with pytest.raises(ValueError, match="x must be"):
        decode_linear(torch.randn(9, 64, device=device), w, torch.empty(9, 8, device=device))
    with pytest.raises(ValueError, match="out must be"):
        decode_linear(torch.randn(1, 64, device=device), w, torch.empty(1, 9, device=device))
    stacked = make_weight(FORMATS["int8"], 8, 64, device, experts=2)
    with pytest.raises(ValueError, match="row_expert"):
        decode_linear(torch.randn(1, 64, device=device), stacked, torch.empty(1, 8, device=device))


@pytest.mark.parametrize("fmt,m,ready", [("float", 1, False), ("int4g128", 1, False), ("planes128", 1, False),
                                         ("int4g32", 3, False), ("planes128", 3, False), ("binary", 1, False),
                                         ("binary", 3, False), ("float", 1, True), ("planes128", 1, True),
                                         ("binary", 1, True), ("int4g32", 3, True)])
def test_conv_epilogue_writes_the_conv_step_of_the_stored_output(fmt, m, ready, device):
    """in_proj with the conv step in its epilogue: ``out`` is x @ W^T as without it, and ``xc`` is the conv-update
    reference applied to the first D stored columns and the old state (which is left unchanged). ``ready``
    (``conv_ready``, ``DecodePolicy.early_reads``): the conv operands read with the weight (one row; ignored at 3)."""
    torch.manual_seed(4)
    d, di, width = 96, 136, 4
    w = weight_for(fmt, 2 * di, d, device, seed=5)
    x = torch.randn(m, d, device=device)
    state = torch.randn(m, di, width, device=device)
    conv_w = torch.randn(di, width, device=device)
    conv_b = torch.randn(di, device=device)
    before = state.clone()
    out, xc = poisoned(m, 2 * di, device), poisoned(m, di, device)
    decode_linear(x, w, out, conv_out=(state, conv_w, conv_b, xc), conv_ready=ready)
    torch.testing.assert_close(out, matmul_ref(x, w).float(), atol=1e-4, rtol=1e-4)
    want, _ = causal_conv1d_update_ref(out[:, :di], state, conv_w, conv_b, "silu")
    torch.testing.assert_close(xc, want.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(state, before)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("block", [None, 4])
@pytest.mark.parametrize("unpack", ["shift", "denorm"])
def test_binary_matches_the_factored_form(m, block, unpack, device):
    """1-bit signs (K = 320: 10 sign words, padded to 16 in the tile) against the 1-bit twin ``(x alpha) S^T + x .
    beta``, with a bias; ``block`` 4: several programs and a ragged last one. ``denorm``: the bits masked in place
    and read as subnormal floats against alpha_denorm (``layout.binary_denorm_vectors``)."""
    torch.manual_seed(10 + m)
    n, k = 37, 320
    w = weight_for("binary", n, k, device)
    assert w.fmt == FMT_BINARY and DecodePolicy().takes(w, m)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device)
    policy = DecodePolicy.for_device(device) if block is None else \
        DecodePolicy(pdl=False, block_n_binary=block, num_warps=4 if device.type == "cuda" else 1)
    policy = dataclasses.replace(policy, int4_unpack=unpack, formats=DecodePolicy().formats)
    out = decode_linear(x, w, poisoned(m, n, device), bias=bias, policy=policy)
    torch.testing.assert_close(out, binary_matmul_ref(x, w, bias).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode_linear_ref(x, w, bias=bias), binary_matmul_ref(x, w, bias).float(), atol=1e-5,
                               rtol=1e-5)


def test_binary_the_kernels_do_not_take(device):
    """A per-row scale or a K that is not a multiple of 32 keeps a 1-bit weight on the 1-bit kernels: the policy says
    no and the kernel refuses; a policy without the format says no too. The CUDA policy takes 1-bit weights at one
    row (session 20) and leaves batches of 2+, routed stacks too, to the 1-bit kernels."""
    w = weight_for("binary", 8, 64, device)
    scaled = BinaryWeight(w.n, w.k, w.qweight, w.alpha, w.beta, torch.ones(1, 8, device=device))
    ragged = weight_for("binary", 8, 40, device)
    for bad in (scaled, ragged):
        assert not DecodePolicy().takes(bad, 1)
        with pytest.raises(ValueError, match="1-bit"):
            decode_linear(torch.randn(1, bad.k, device=device), bad, torch.empty(1, 8, device=device))
    assert DecodePolicy().takes(w, 1)
    cuda = DecodePolicy.cuda(132, False)
    stacked = weight_for("binary", 8, 64, device, experts=2)
    assert cuda.takes(w, 1) and cuda.takes(stacked, 1, routed=True)
    assert not cuda.takes(w, 2) and not cuda.takes(stacked, 2, routed=True)
    assert not dataclasses.replace(cuda, formats=(0, 1, 3)).takes(w, 1)


def test_binary_denorm_vectors_are_kept_and_follow_in_place_changes(device):
    """The 1-bit "denorm" vectors are computed once per weight record, again after alpha changes in place, and for
    weights made under ``torch.inference_mode`` (no version counter) too."""
    w = weight_for("binary", 8, 64, device)
    first = binary_denorm_of(w)
    assert binary_denorm_of(w)[0] is first[0]
    w.alpha.mul_(2)
    again = binary_denorm_of(w)
    assert again[0] is not first[0]
    torch.testing.assert_close(again[0], binary_denorm_vectors(w.alpha, w.beta)[0], atol=0, rtol=0)
    with torch.inference_mode():
        frozen = weight_for("binary", 8, 64, device)
    a, g = binary_denorm_of(frozen)
    torch.testing.assert_close(g, (frozen.beta.float() - frozen.alpha.float()), atol=0, rtol=0)


def _rms_normed(h, norm_w, eps):
    """The model's RMSNorm of fp32 rows (an independent twin of NormOut + NormIn)."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w


@pytest.mark.parametrize("fmt", ["float", "int8", "planes128", "binary"])
@pytest.mark.parametrize("router", [False, True])
def test_norm_out_epilogue(fmt, router, device):
    """:class:`NormOut`: a producer's epilogue adds its output to the residual in place, writes ``u = h * w`` (and
    its input planes 0..7) and accumulates ``sum h^2`` and the router's ``W_r u`` by atomic adds over its programs
    (8 rows each: 7 programs, a ragged last one); ``out`` is not written. Against :func:`norm_out_ref` of the
    dequantized matmul's output, and that twin against the plain sums. The planes' word sums (``word_sums``,
    ``DecodePolicy.producer_word_sums``) added by every program equal plane 8 of :func:`int4_x_planes` of ``u``."""
    from qmamba.quant.layout import int4_x_planes

    torch.manual_seed(5)
    n, k, e = 52, 160, 5
    policy = DecodePolicy(pdl=False, block_n_int4=8, block_n_float=8, block_n_binary=8, num_warps=1,
                          int4_unpack="denorm")
    w = weight_for(fmt, n, k, device, seed=6)
    x = torch.randn(1, k, device=device)
    res0 = torch.randn(1, n, device=device)
    acc = torch.zeros(1 + e + 2, device=device)  # longer than needed: the tail stays 0
    nout = NormOut(res0.clone(), torch.rand(n, device=device) + 0.5, acc, torch.full((1, n), float("nan"),
                   device=device), planes=torch.zeros(1, 9, 128, device=device),
                   router_w=torch.randn(e, n, device=device) if router else None,
                   word_sums=torch.zeros(1, 16, device=device))
    out = poisoned(1, n, device)
    decode_linear(x, w, out, policy=policy, norm_out=nout)
    y = matmul_ref(x, w).float()
    h, u, sums = norm_out_ref(y, NormOut(res0, nout.weight, acc, nout.x, router_w=nout.router_w))
    torch.testing.assert_close(h, res0 + y)
    torch.testing.assert_close(sums[0], ((res0 + y) ** 2).sum())
    torch.testing.assert_close(nout.residual, h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nout.x, u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc[:sums.numel()], sums, atol=1e-3, rtol=1e-5)
    assert torch.equal(acc[sums.numel():], torch.zeros_like(acc[sums.numel():]))
    torch.testing.assert_close(nout.planes[:, :8], int4_x_planes(nout.x)[:, :8], atol=0, rtol=0)
    torch.testing.assert_close(nout.word_sums, int4_x_planes(nout.x)[:, 8, :16], atol=1e-22, rtol=1e-5)
    assert torch.isnan(out).all()  # the output itself is not stored
    with pytest.raises(ValueError, match="out_word_sums"):
        decode_linear(x, w, out, policy=policy, norm_out=dataclasses.replace(nout, word_sums=torch.zeros(1, 8,
                                                                                                    device=device)))


@pytest.mark.parametrize("fmt", ["float", "planes128", "binary"])
def test_norm_in_equals_the_normed_input(fmt, device):
    """:class:`NormIn` behind :class:`NormOut`: in_proj-like (bias, conv epilogue), a routed gated fc1 and fc2 whose
    expert and weight come from the router sums, and a head, each fed ``u`` (or its planes) and scaled by ``1 /
    rms``, against the same matrices on the normed input (RMSNorm, the sigmoid top-1 router) computed
    independently."""
    from qmamba.quant.layout import int4_x_planes

    torch.manual_seed(6)
    d, n, f, e, eps = 160, 45, 64, 4, 1e-5
    policy = DecodePolicy(pdl=False, block_n_int4=4, block_n_float=8, num_warps=1, int4_unpack="denorm",
                          int4_x_in_tile=True)
    h = torch.randn(1, d, device=device) * 3
    norm_w = torch.rand(d, device=device) + 0.5
    router_w, router_b = torch.randn(e, d, device=device), torch.randn(e, device=device)
    acc = torch.zeros(1 + e, device=device)
    nout = NormOut(torch.zeros(1, d, device=device), norm_w, acc, torch.empty(1, d, device=device),
                   planes=torch.zeros(1, 9, 256, device=device), router_w=router_w)
    eye = PackedWeight.from_float(torch.eye(d, device=device))  # a producer that outputs h itself
    decode_linear(h, eye, poisoned(1, d, device), policy=DecodePolicy(pdl=False, block_n_float=16, num_warps=1),
                  norm_out=nout)
    xn = _rms_normed(h, norm_w, eps)  # the layer's input as the model computes it
    planes = int4_x_planes(nout.x) if fmt == "planes128" else None
    u = nout.x if fmt != "planes128" else torch.full_like(nout.x, float("nan"))  # planes: x itself not read
    kw = dict(x_planes=planes, x_plane_sums=False) if planes is not None else {}
    nin = NormIn(acc, d, eps)
    # in_proj-like: bias and the conv epilogue
    w = weight_for(fmt, n, d, device, seed=7)
    bias = torch.randn(n, device=device)
    di, width = 20, 4
    state = torch.randn(1, di, width, device=device)
    conv_w, conv_b = torch.randn(di, width, device=device), torch.randn(di, device=device)
    conv = (state, conv_w, conv_b, poisoned(1, di, device))
    out = decode_linear(u, w, poisoned(1, n, device), bias=bias, conv_out=conv, policy=policy, norm_in=nin, **kw)
    torch.testing.assert_close(out, matmul_ref(xn, w, bias).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, decode_linear_ref(nout.x, w, bias=bias, norm_in=nin), atol=1e-4, rtol=1e-4)
    want_conv, _ = causal_conv1d_update_ref(out[:, :di], state, conv_w, conv_b, "silu")
    torch.testing.assert_close(conv[3], want_conv.float(), atol=1e-5, rtol=1e-5)
    # the MoE layer: expert and weight from the router sums
    p = torch.sigmoid(xn @ router_w.t() + router_b)
    weight, idx = p.max(-1)
    idx = idx.to(torch.int32)
    other = torch.tensor([(int(idx) + 1) % e], dtype=torch.int32, device=device)  # a wrong fallback buffer
    fc1 = weight_for(fmt, 2 * f, d, device, experts=e, seed=8)
    fc2 = weight_for(fmt, d, f, device, experts=e, seed=9)
    route = dataclasses.replace(nin, route=True, router_b=router_b)
    act = decode_linear(u, fc1, poisoned(1, f, device), row_expert=other, gated="silu", policy=policy,
                        norm_in=route, **kw)
    want_act = gated_act_ref(matmul_ref(xn, fc1, row_expert=idx), "silu", True).float()
    torch.testing.assert_close(act, want_act, atol=1e-4, rtol=1e-4)
    y = decode_linear(act, fc2, poisoned(1, d, device), row_expert=other, row_scale=torch.zeros(1, device=device),
                      policy=policy, expert_ready=True, norm_in=dataclasses.replace(route, scale=False))
    torch.testing.assert_close(y, matmul_ref(act, fc2, row_expert=idx).float() * weight[:, None], atol=1e-4,
                               rtol=1e-4)
    # one row only; the scale's width is the input's
    with pytest.raises(ValueError, match="one input row"):
        decode_linear(u.expand(2, d), w, poisoned(2, n, device), policy=policy, norm_in=nin)
    with pytest.raises(ValueError, match="width"):
        decode_linear(act, fc2, poisoned(1, d, device), row_expert=idx, policy=policy, norm_in=nin)
