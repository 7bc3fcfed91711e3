"""The general int4 matmuls on plane words (``FMT_INT4_PLANES``: GEMV reduction, small-M tensor-core tiles, the
prefill GEMM and the grouped expert GEMM, the dequantization pass) against x @ the dequantized weight, and against
the same weight in the stored layout; ragged K (padded tail tiles), split-K, routed rows."""

import pytest
import torch

from qmamba.kernels.dequantize import dequantize_stack, dequantize_stack_triton
from qmamba.kernels.matmul_configs import GEMV_MAX_M, MatmulConfig, pick_config
from qmamba.kernels.quant_matmul import dequant_matmul, dequant_matmul_ref
from qmamba.kernels.routing import expert_tile_map
from qmamba.kernels.weights import FMT_INT4_PLANES
from qmamba.quant.formats import Int4Format

M_VALUES = [1, 5, GEMV_MAX_M + 17]  # GEMV reduction, small-M dot, GEMM


def plane_weight(n, k, device, group=128, symmetric=False, lead=(), seed=0):
    """``(words form, planes form)`` of one random int4 weight."""
    gen = torch.Generator().manual_seed(seed)
    fmt = Int4Format(group, symmetric=symmetric)
    w = torch.randn(*lead, n, k, generator=gen) / k ** 0.5
    words = fmt.kernel_weight({key: t.to(device) for key, t in fmt.quantize_rtn(w).items()}, n, k)
    return words, words.to_planes()


def close(got, ref, dtype):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.mark.parametrize("group,symmetric", [(128, False), (256, False), (128, True)])
@pytest.mark.parametrize("m", M_VALUES)
def test_dense_planes_match_dequantized_and_words(group, symmetric, m, device):
    n, k = 40, 300  # K = 300: the last plane tile is mostly padding
    words, planes = plane_weight(n, k, device, group, symmetric)
    assert planes.fmt == FMT_INT4_PLANES
    dtype = _dtype(device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device)
    got = dequant_matmul(x, planes, bias)
    ref = x.float() @ words.dequantized()[0].t() + bias
    assert got.dtype == dtype and got.shape == (m, n)
    close(got, ref, dtype)
    close(got, dequant_matmul(x, words, bias), dtype)


@pytest.mark.parametrize("m", [3, GEMV_MAX_M + 9])
def test_routed_planes_by_expert_and_tiles(m, device):
    n, k, experts = 24, 256, 3
    _, planes = plane_weight(n, k, device, lead=(experts,), seed=1)
    x = torch.randn(m, k, device=device)
    idx = torch.randint(0, experts, (m,), device=device, dtype=torch.int32)
    scale = torch.rand(m, device=device)
    ref = dequant_matmul_ref(x, planes, row_expert=idx, row_scale=scale)
    close(dequant_matmul(x, planes, row_expert=idx, row_scale=scale), ref, torch.float32)
    if m > GEMV_MAX_M:  # the grouped GEMM over expert tiles, as the MoE prefill calls it
        cfg = pick_config(m, planes, x.device)
        tiles = expert_tile_map(idx, experts, cfg.block_m)
        close(dequant_matmul(x, planes, row_expert=idx, row_scale=scale, tiles=tiles), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, "half", torch.float16])
@pytest.mark.parametrize("group,symmetric", [(128, False), (256, True)])
def test_plane_codes_as_floats_match_reference(group, symmetric, dtype, device):
    """``MatmulPolicy.plane_float_codes`` / ``plane_weight_left`` / ``plane_(gemm_)code_pairs``: the GEMM kernel on
    plane words with the codes unpacked as integers, as floats (2^23 trick) or two at a time (exact, or scaled into
    the accumulator; low-precision inputs only, the inline PTX on CUDA), as ``x W^T`` or ``(W x^T)^T``, for routed
    expert tiles and dense rows (split-K too), and the small-M kernel with either unpacking, ragged K
    (BlackMamba-2.8B's 1472 = 11.5 tiles on CUDA): equal to the reference, and to each other."""
    from qmamba.kernels.matmul_configs import MatmulPolicy

    # "half": bf16 on CUDA; the interpreter's dots have no bf16 (numpy), fp16 takes the same (non-IEEE) path there.
    # float16 itself (the pairs' other PTX) on CUDA only: on the CPU it is "half" again
    if dtype == torch.float16 and device.type != "cuda":
        pytest.skip("float16 is the interpreter's 'half' already")
    dtype = dtype if dtype in (torch.float32, torch.float16) else torch.bfloat16 if device.type == "cuda" \
        else torch.float16
    n, k, experts, m = 40, 1472 if device.type == "cuda" else 300, 3, GEMV_MAX_M + 15
    words, planes = plane_weight(n, k, device, group, symmetric, lead=(experts,), seed=5)
    x = torch.randn(m, k, device=device).to(dtype)
    idx = torch.tensor([(i * 7) % experts for i in range(m)], device=device, dtype=torch.int32)
    scale = torch.rand(m, device=device)
    ref = dequant_matmul_ref(x.float(), planes, row_expert=idx, row_scale=scale)
    tiles = expert_tile_map(idx, experts, pick_config(m, planes, x.device).block_m)
    one = planes.expert(1)
    dense_ref = x.float() @ words.expert(1).dequantized()[0].t()
    first = None
    for float_codes, weight_left, pairs in ((False, False, ""), (True, False, ""), (True, True, ""), (False, True, ""),
                                            (True, True, "exact"), (True, True, "scaled"), (True, False, "scaled")):
        policy = MatmulPolicy(plane_float_codes=float_codes, plane_weight_left=weight_left, plane_code_pairs=pairs,
                              plane_gemm_code_pairs=pairs)
        got = dequant_matmul(x, planes, row_expert=idx, row_scale=scale, tiles=tiles, policy=policy)
        close(got, ref, dtype)
        first = got if first is None else first
        close(got, first, dtype)
        for cfg in (pick_config(m, one, x.device), MatmulConfig(32, 16, 128, split_k=2, num_warps=1, num_stages=1)):
            close(dequant_matmul(x, one, config=cfg, policy=policy), dense_ref, dtype)
        # the small-M kernel (M <= 16, batched decode) unpacks the same way: tiles of 16 rows, split-K
        close(dequant_matmul(x[:5], one, config=pick_config(5, one, x.device), policy=policy), dense_ref[:5], dtype)


def test_planes_split_k_configs(device):
    _, planes = plane_weight(24, 520, device, seed=2)  # 5 plane tiles
    x = torch.randn(19, 520, device=device)
    ref = dequant_matmul_ref(x, planes)
    for cfg in (MatmulConfig(16, 16, 128, split_k=3, num_warps=1, num_stages=1),  # small-M kernel, split-K
                MatmulConfig(1, 8, 128, split_k=2, num_warps=1, num_stages=1)):
        rows = x[:cfg.block_m] if cfg.block_m == 1 else x[:5]
        close(dequant_matmul(rows, planes, config=cfg), ref[:rows.shape[0]], torch.float32)
    close(dequant_matmul(x, planes, config=MatmulConfig(32, 16, 128, split_k=2, num_warps=1, num_stages=1)), ref,
          torch.float32)  # GEMM kernel, split-K


def test_dequantize_stack_of_planes_equals_words(device):
    words, planes = plane_weight(33, 300, device, lead=(2,), seed=3)
    expected = dequantize_stack(words, torch.float32)
    for got in (dequantize_stack(planes, torch.float32), dequantize_stack_triton(planes, torch.float32)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["words", "planes"])
@pytest.mark.parametrize("whole_stack", [False, True])
def test_experts_via_dense_matches_reference(form, whole_stack, device):
    """The prefill MoE's dequantize-then-float route (one expert's matrix dequantized, then the float tile kernel
    on its row tiles only; ``whole_stack``: every expert in one pass, one grouped GEMM), directly and through
    ``dequant_matmul``'s dispatch (CUDA, low-precision inputs)."""
    from qmamba.kernels.matmul_configs import MatmulPolicy
    from qmamba.kernels.quant_matmul import experts_via_dense

    n, k, experts, m = 40, 256, 4, 37
    words, planes = plane_weight(n, k, device, lead=(experts,), seed=4)
    w = planes if form == "planes" else words
    x = torch.randn(m, k, device=device)
    idx = torch.tensor([i % 3 for i in range(m)], device=device, dtype=torch.int32)  # expert 3 idle
    scale = torch.rand(m, device=device)
    bias = torch.randn(n, device=device)
    ref = dequant_matmul_ref(x, w, bias=bias, row_expert=idx, row_scale=scale)
    got = experts_via_dense(x, w, bias, idx, scale, whole_stack=whole_stack)
    close(got, ref, torch.float32)
    if device.type == "cuda":
        xb = x.to(torch.bfloat16)
        got = dequant_matmul(xb, w, bias, row_expert=idx, row_scale=scale,
                             policy=MatmulPolicy(dequant_experts_min_m=0, dequant_experts_whole_stack=whole_stack))
        close(got, dequant_matmul_ref(xb, w, bias=bias, row_expert=idx, row_scale=scale), torch.bfloat16)


def test_pairs_mode_per_kernel(monkeypatch, device):
    """``MatmulPolicy.plane_gemm_code_pairs`` reaches the GEMM kernel (M > 16, expert tiles) and
    ``plane_code_pairs`` the small-M kernel (2..16 rows), each its own mode; the defaults are "scaled" / "exact"
    (benchmarks/results.md, sessions 34-35)."""
    from qmamba.kernels import dequant_gemm, quant_matmul
    from qmamba.kernels.matmul_configs import DEFAULT_POLICY, MatmulPolicy

    assert (DEFAULT_POLICY.plane_gemm_code_pairs, DEFAULT_POLICY.plane_code_pairs) == ("scaled", "exact")
    with pytest.raises(ValueError, match="plane_gemm_code_pairs"):
        MatmulPolicy(plane_gemm_code_pairs="fast")
    seen = []

    def spy(mode, weight, x):
        seen.append(mode)
        return real(mode, weight, x)

    real = dequant_gemm.plane_pairs_args
    monkeypatch.setattr(dequant_gemm, "plane_pairs_args", spy)
    monkeypatch.setattr(quant_matmul, "plane_pairs_args", spy)
    _, planes = plane_weight(40, 256, device)
    x = torch.randn(GEMV_MAX_M + 9, 256, device=device).to(torch.float16 if device.type != "cuda" else torch.bfloat16)
    policy = MatmulPolicy(plane_code_pairs="", plane_gemm_code_pairs="exact")
    for m, mode in ((GEMV_MAX_M + 9, "exact"), (5, "")):
        seen.clear()
        # a config given: CUDA's dequantization pass + cuBLAS for dense rows above 16 is not taken
        got = dequant_matmul(x[:m], planes, policy=policy, config=pick_config(m, planes, x.device, policy=policy))
        assert seen == [mode]
        close(got, dequant_matmul_ref(x[:m].float(), planes), x.dtype)


def test_using_policy_scopes_the_default(device):
    """``using_policy`` sets the policy of matmuls called without one (a prefill under a benchmark's route), and
    only inside its block: with the 1-bit word GEMV switched off the tile configuration is chosen."""
    from qmamba.kernels.matmul_configs import (DEFAULT_POLICY, MatmulPolicy, current_policy, pick_binary_config,
                                               using_policy)

    assert current_policy() is DEFAULT_POLICY
    off = MatmulPolicy(binary_word_gemv=False)
    weight = type("W", (), {"n": 64, "k": 64})()
    word = pick_binary_config(4, weight, device)
    with using_policy(off):
        assert current_policy() is off
        assert pick_binary_config(4, weight, device) != word
        assert pick_binary_config(4, weight, device) == pick_binary_config(4, weight, device, off)
    assert current_policy() is DEFAULT_POLICY and pick_binary_config(4, weight, device) == word


@pytest.mark.parametrize("tile", [(64, 128, 8, 4), (32, 128, 8, 4)])
def test_plane_gemm_tile_from_the_policy(tile, device):
    """``MatmulPolicy.plane_gemm_tile`` sets the GEMM tile of plane words above 64 rows on CUDA (here a stand-in
    device: the interpreter takes its own small tiles), scoped like every policy field, and the grouped expert
    GEMM with that tile matches the reference on the GPU."""
    from qmamba.kernels.matmul_configs import MatmulPolicy, gemm_config, using_policy

    cuda_like = type("D", (), {"type": "cuda", "index": None})()
    _, planes = plane_weight(192, 256, device, lead=(3,))
    policy = MatmulPolicy(plane_gemm_tile=tile)
    cfg = gemm_config(512, planes, cuda_like, policy)
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.block_k) == (*tile, 128)
    with using_policy(policy):
        assert gemm_config(512, planes, cuda_like) == cfg
    assert gemm_config(512, planes, cuda_like) != cfg  # the default policy's tile outside the block
    with pytest.raises(ValueError, match="plane_gemm_tile"):
        MatmulPolicy(plane_gemm_tile=(64, 128, 4))
    if device.type == "cuda":  # the tile itself (the interpreter runs one warp: its own tile is tested above)
        m = 300
        x = torch.randn(m, 256, device=device).to(torch.bfloat16)
        idx = torch.randint(0, 3, (m,), device=device, dtype=torch.int32)
        tiles = expert_tile_map(idx, 3, cfg.block_m)  # cfg: the policy's tile, as gemm_config gave it above
        got = dequant_matmul(x, planes, row_expert=idx, tiles=tiles, config=cfg)
        close(got, dequant_matmul_ref(x, planes, row_expert=idx), torch.bfloat16)


def _run_pair_asm(asm: str, regs: dict) -> int:
    """A tiny interpreter for the PTX of :func:`qmamba.kernels.dequant_gemm._pair_asm` (``mov``, ``shr.u32``,
    ``lop3.b32``, ``fma.rn.bf16x2`` / ``fma.rn.f16x2`` on 32-bit registers): ``$0`` after running it on ``regs``."""
    import re

    def val(op):
        return regs[op] if op in regs else int(op, 0) & 0xFFFFFFFF

    def halves(v, dt):
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(dt).double()

    for ins in (part.strip() for part in asm.strip("{} ").split(";")):
        if not ins or ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "shr.u32":
            regs[a[0]] = val(a[1]) >> int(a[2])
        elif op == "lop3.b32":
            x, y, z, lut = val(a[1]), val(a[2]), val(a[3]), int(a[4], 0)
            out = 0
            for bit in range(8):  # bit (4 a + 2 b + c) of the table, as PTX's F(0xF0, 0xCC, 0xAA)
                if lut >> bit & 1:
                    m = ((x if bit & 4 else ~x) & (y if bit & 2 else ~y) & (z if bit & 1 else ~z)) & 0xFFFFFFFF
                    out |= m
            regs[a[0]] = out
        elif re.fullmatch(r"fma\.rn\.(bf16x2|f16x2)", op):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            r = (halves(val(a[1]), dt) * halves(val(a[2]), dt) + halves(val(a[3]), dt)).to(dt)
            bits = r.view(torch.int16).to(torch.int32) & 0xFFFF
            regs[a[0]] = int(bits[0]) | int(bits[1]) << 16
        else:
            raise AssertionError(f"unexpected PTX: {ins}")
    return regs["$0"]


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_pair_asm_unpacks_both_nibbles(fp16, scaled):
    """The inline PTX of ``MatmulPolicy.plane_code_pairs`` (which only a GPU runs; the interpreter takes the
    elementwise twin) read by a small PTX interpreter: for every shift and a spread of registers (here a word's own
    two halves: nibbles i and i + 4), zero points and scales, each 16-bit half of the result is ``code - zero``
    (times the scale in the input's type) of its own half's nibble, as the elementwise twin computes it."""
    from qmamba.kernels.dequant_gemm import _pair_asm

    dt = torch.float16 if fp16 else torch.bfloat16
    magic = 1024.0 if fp16 else 128.0
    gen = torch.Generator().manual_seed(11)
    words = torch.randint(-2 ** 31, 2 ** 31, (24,), generator=gen, dtype=torch.int64).tolist() + [0, -1, 0x12345678]
    for shift in (0, 4, 8, 12):
        asm = _pair_asm(shift, fp16, scaled)
        for n, word in enumerate(words):
            zero = n % 16
            scale = torch.tensor(0.0123 * (n + 1), dtype=torch.float16)  # stored as fp16, as the format keeps it
            pair = lambda v: int(v[0]) | int(v[1]) << 16  # noqa: E731
            negz = torch.tensor([-(magic + zero)] * 2, dtype=dt).view(torch.int16).to(torch.int32) & 0xFFFF
            sc = scale.to(dt).repeat(2).view(torch.int16).to(torch.int32) & 0xFFFF
            src = word & 0xFFFFFFFF  # the word's two 16-bit halves, as the kernel packs them
            got = _run_pair_asm(asm, {"$1": src, "$2": pair(negz), "$3": pair(sc)})
            got = torch.tensor([got & 0xFFFF, got >> 16], dtype=torch.int32).to(torch.int16).view(dt)
            codes = torch.tensor([(src >> (shift + 16 * h)) & 0xF for h in (0, 1)], dtype=torch.float32) - zero
            want = (codes * scale.to(dt).float() if scaled else codes).to(dt)
            assert torch.equal(got, want), (shift, hex(src), zero, got, want)
