"""Launch configurations of the general matmul kernels, in one place: the tile sizes by M and shape
(:func:`pick_config` and :func:`gemm_config` for the float/int8/int4 kernels of :mod:`qmamba.kernels.quant_matmul`,
:func:`pick_binary_config` for the 1-bit ones of :mod:`qmamba.kernels.binary_matmul`), the M thresholds between the
paths, and :class:`MatmulPolicy`, the explicit switch of which kernel paths may be taken (tests and benchmarks pass
one to check or time a path beside the default; nothing flips module globals).

The numbers come from the H100/H200 sweeps in ``benchmarks/`` (cited at each heuristic).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from qmamba.kernels._triton import cdiv
from qmamba.kernels.routing import ROUTE_BY_EXPERT, ROUTE_DENSE
from qmamba.kernels.weights import FMT_INT4, FMT_INT4_PLANES, FMT_INT8, BinaryWeight, PackedWeight
from qmamba.quant.layout import INT4_TILE

GEMV_MAX_M = 16  # up to this many rows: the small-M kernels (decode); above: the prefill GEMM paths


@dataclass(frozen=True)
class MatmulPolicy:
    """Which paths the general matmuls may take; the defaults are the measured choices.

    ``int4_word_gemv``: M = 1 int4 on CUDA takes the 32-bit-word kernel (no int-to-float conversions); False: the
    generic tile kernel. ``binary_word_gemv``: the 1-bit 32-bit-word kernel (sign-bit flips, no multiplies);
    False: the tile kernel. The 1-bit word kernel reads the weights once per row, so beyond M = 1 it is taken only
    for up to ``word_gemv_max_rows`` rows of a matrix of at most ``word_gemv_max_weights`` (N * K) weights (H200: at
    M = 4 1.5-3x faster than the tile kernel on the BlackMamba-2.8B shapes, at M = 16 slower on most of them).
    ``binary_word_dots_min_rows``: a 1-bit matrix (not a routed stack) from this many rows to 16 (K a multiple of
    32) takes the tile kernel's bit-position dots (:mod:`qmamba.kernels.binary_matmul`: the signs read as words,
    each bit position a tensor-core dot, each weight read once for all rows) instead of the word GEMV, which reads
    it once a row. H100, session 32, batch-8 1-bit + int4 decode: in_proj 13.9 against 23.7 us, out_proj 13.0
    against 13.9; at batch 2 the dots lost (the step 1.465 against 0.998 ms/token with them on every 1-bit matmul),
    and on the routed expert stacks too (fc1 44.6 against 30.4 us at batch 8): from 8 rows, dense only. A value
    above 16 turns them off.
    ``dequant_experts_min_m``: routed int8/int4 expert stacks on CUDA from this many rows run expert by expert as
    one dequantization pass of that expert's matrix then the float tile kernel on its rows. Off by default: on the
    H200 (benchmarks/results.md, "session 12") it cuts fc1's GPU time at M = 2048 from 483 to 338 us (fc2 294 ->
    289) but adds two launches per expert, and the prefill is bound by host time (41 ms wall for 18 ms of kernels
    in bf16): end to end the int4 prefill lost (23.6k against 38.7k tokens/s in an earlier run that day).
    ``dequant_experts_whole_stack``: on that route, all experts in one dequantization pass (a ``[E, N, K]``
    temporary in the input's type: 182 MB for BlackMamba-2.8B's fc1) and one float grouped GEMM over every tile,
    two launches in all. H200, session 17 (8 experts): fc1 243 us at M = 2048 against 298 for the int4 tile kernel,
    but 176 against 124 at M = 512; with the 182 MB temporary, off.
    ``plane_float_codes``: the GEMM kernel (M > 16, expert tiles), the small-M kernel (M <= 16: batched decode) and
    the dequantization pass unpack int4 plane codes as floats by the 2^23 trick instead of integer-to-float
    conversions (low-precision inputs). H200, session 17, 64 x 128 tiles, 8 experts at M = 2048: fc1 350 -> 298 us,
    fc2 183 -> 166 (one dot per 2 or 4 nibble positions instead of one was slower, 347 / 353 us, and is gone).
    ``plane_gemm_tile`` (block_m, block_n, warps, stages): the GEMM kernel's tile on int4 plane words above 64
    rows (the grouped expert GEMM of the MoE prefill). 64 x 128 with 4 warps at every M, H200 session 17
    (bench_planes_gemm.py --sweep, 8 experts, M = 512 / 2048 tokens): fc1 124 / 297 us, fc2 81 / 167 us against
    239 / 486 and 190 / 294 for 128 x 128 with 8 warps; every wider tile was slower (sessions 19 and 23 likewise
    for the ``W x^T`` product and for the smaller, more resident tiles 64 x 64, 32 x 128, 32 x 64, 64 x 32).
    ``plane_weight_left``: the GEMM kernel takes the product as ``W x^T`` on plane words, the dequantized tile the
    tensor cores' left operand, read from registers, instead of copied to shared memory as the right one. H200,
    session 19 (``bench_planes_gemm.py --parts experts --m 2048 --sweep``, 64 x 128 tiles, 8 experts): fc1 298 ->
    261 us, fc2 166 -> 145 (bf16 experts 156 / 94), faster at each of the sweep's six tiles; level at M = 256 /
    512. On.
    ``plane_code_pairs``: the small-M kernel (``plane_gemm_code_pairs``: the GEMM kernel) unpacks the 16-bit inputs'
    int4 plane codes two at a time (:func:`qmamba.kernels.dequant_gemm.plane_code_pairs`: a word's 16-bit halves
    hold four nibble positions each; with two halves a register, a shift, a logic instruction and one packed FMA
    make two codes ``code - zero`` exactly; inline PTX, sm_80+). "exact" (the small-M kernel's default): the group
    scale still multiplies each tile's partial products in float32, as with float codes; "scaled": one more packed
    FMA multiplies the codes by the scale rounded to the input's type (bfloat16 rounds the fp16 scale: ~2^-9
    relative per group, tiny-blackmamba's perplexity 73.196 -> 73.205 with every matrix so,
    benchmarks/ppl_scale_rounding.py; float16 keeps it exact), and the products go straight into one accumulator;
    ``""``: float codes (:func:`plane_codes`). sm_90, Triton 3.6 (fc1, 8 experts at M = 2048, 64 x 128 tiles,
    ``W x^T``; ``inspect_gemm_kernel.py --pairs --loop``): the K loop 850 -> 521 / 522 SASS instructions a thread (exact
    / scaled). H100, session 34 (``bench_planes_gemm.py --parts experts --m 2048,256 --sweep``, 8 experts, us, float
    codes / exact / scaled at 64 x 128): fc1 at M = 2048 217.6 / 175.7 / 162.3, fc2 134.8 / 100.8 / 135.0 (scaled at
    128 x 128 with 4 warps, 2 stages: 166.0 / 86.3; bf16 141.6 / 68.9); M = 256: fc1 54.9 / 40.8 / 45.7, fc2 46.1 /
    38.6 / 39.8. Graph prefill of 2,048 tokens (int4 as ``qmamba quantize`` writes it): 150.5k -> 169.9k tok/s exact
    (scaled at 128 x 128: 172.3k; bf16 194.6k); batch-8 decode 1.468 -> 1.428 ms/token (scaled 1.445). Unlike
    session 19's pairs (removed below) the zero point comes off in registers, with no correction.
    ``plane_gemm_code_pairs``: the same choice for the GEMM kernel (M > 16 and expert tiles: the prefill's grouped
    expert GEMM), "scaled" by default: H100, session 35, graph prefill of 2,048 tokens (``profile_prefill.py
    --format int4_cli --graph --experts tiles_pairs,tiles_pairss``) 169.6k -> 174.1k tok/s (bf16 194.9k), the expert
    GEMMs 5.10 -> 4.84 ms of the prefill's kernels; the small-M kernel keeps "exact" (batch 8 above).
    ``gemm_gated_act``: the prefill's grouped fc1 GEMM (a gated MoE, int8 / int4 / float experts) applies
    ``act(gate) * up`` in its epilogue and writes the ``[M, F]`` activation fc2 reads, instead of ``[M, 2F]`` for
    an elementwise kernel (:func:`qmamba.kernels.fused_moe.gated_act`; H100, session 35: 280 us of a 2,048-token
    graph prefill's 11.9 ms, plus fc1's twice-as-wide store). On: H100, session 36 (``profile_prefill.py --format
    int4_cli|bf16 --graph --experts tiles_ungated,tiles``), graph prefill of 2,048 tokens, int4 as ``qmamba
    quantize`` writes it 175.4k -> 178.8k tok/s, bf16 197.0k -> 201.4k; the elementwise kernel's 281 us go, fc1
    takes 62 us more (int4; bf16 110).
    ``w4a8_min_m`` (session 40, off: it changes the numerics): from this many rows, the routed int4 plane-word expert
    stacks (the MoE prefill; with ``w4a8_dense`` the dense matrices too) quantize their input per row to int8 and
    run :func:`qmamba.kernels.w4a8_gemm.w4a8_gemm` on int8 tensor cores (the codes masked four at a time, no float
    unpacking) instead of the bf16 paths. The activations are rounded to int8 with a per-row scale (built-in tiny
    BlackMamba, int4 g128 GPTQ, held-out perplexity 58.953 -> 58.951, ``benchmarks/eval_w4a8.py``). H100, session
    40 (``profile_prefill.py --format int4_cli --graph --experts tiles,w4a8``, experts only, fc1's activation then an
    elementwise kernel): graph prefill of 2,048 tokens 178.2k -> 183.7k tok/s (bf16 200.8k in the same call).
    Session 41: a gated fc1 has the activation in the W4A8 GEMM's epilogue, and ``w4a8_tile`` takes the product as
    ``W x^T`` (the weight codes the left operand, read by the tensor cores from registers: no shared-memory round
    trip of the unpacked tile; sm_90 K loop 353 -> 302 SASS instructions a thread): H100, 196.3k tok/s against the
    default route's 179.5k and bf16's 202.4k in the same call (``--experts tiles,w4a8_l``), the 36 expert GEMMs 3,386
    us against bf16's 3,888; 128 x 128 (8 warps) 189.8k, 64 x 256 182.8k, session 40's ``x W^T`` tile 175.4k, every
    int4 matrix on W4A8 (128 x 128) 174.0k. With the row quantizer multiplying by the reciprocal instead of dividing
    (444 -> 255 us): 199.7k against 179.0k by default and bf16's 202.0k (0.989x). Off in the default policy; a model
    turns it on for its prefills (:func:`int8_activations`, ``W4A8_PREFILL_MIN_M`` rows) when ``qmamba quantize``'s
    check on its calibration text passed (:mod:`qmamba.calib.int8_check`, session 42) or its caller asks.
    Tried and removed (session 33, commit 3afa750 has the code): the bit-position dots on an input permuted and
    scaled by alpha in one small launch first, each bit position's input 16 contiguous columns, in one flat loop over
    (tile, 8 positions) that Triton pipelines. H100, batch-8 1-bit + int4 decode: 2.339 against 1.798 ms/token (the
    word GEMV 1.992); the dots 23.7 us a call (in_proj 27.8 against 13.9) plus 4.9 for the preparing kernel.
    Tried and removed (sessions 30-31): 128 weight rows a program of the small-M kernel (dense matrices at 2..16
    rows, batched decode), 6-9% faster than 64 alone (H100, ``bench_matmul.py --small-m-tiles``: in_proj 8.28-8.75
    against 8.82-9.66 us, out_proj 6.30-6.52 against 6.71-6.95) but level in the step (session 31, H100, batch 8:
    int4 g128 1.553 against 1.565 ms/token, bf16 2.024 against 2.005); the code is in commit f098da0.
    Tried and removed (session 19): two nibble positions per shift and logic instruction as 16-bit floats
    ``128 + code`` on the ``W x^T`` path, the zero point through per-tile input sums from a pre-pass (fewer
    unpacking instructions, more for the correction): fc1 x8 at M = 2048 260 against 261 us, fc2 162 against 148,
    slower at M = 256 / 512 (commit 627fcaa has the code).
    Tried and removed (session 37): the MoE's fc2 (K > N) on tiles of its own height, the rows mapped into tiles a
    second time (``plane_gemm_tile_long_k``, built in session 36; commit 66813aa has the code). H100, graph prefill of
    2,048 tokens (``profile_prefill.py --format int4_cli --graph --experts tiles,tiles_fc2_...``), fc2's 18 launches
    1,871 us at the shared 64 x 128 w4 s3 against 1,981 (128 x 128 w4 s2), 2,682 (128 x 128 w8 s3), 3,140 (64 x 64 w4
    s3): session 35's kernel bench (87.5 against 134.8 us) had not run fc2 on the MoE's own rows.
    Tried and removed (session 38): the MoE's fc2 split along K into 2-4 pieces, each program adding its partial sums
    into a zeroed float32 result by atomics (``plane_gemm_split_k_long_k``, built in session 37; commit 9076688 has
    the code). H100, graph prefill of 2,048 tokens (``profile_prefill.py --format int4_cli --graph --experts
    tiles,tiles_fc2k2,tiles_fc2k3,tiles_fc2k4``): fc2's 18 launches 1,868 us unsplit against 2,507 / 2,335 / 2,455
    (176.5k against 167.3k-168.9k tok/s): the zeroing, the atomics and the conversion cost more than the second wave.
    Tried and removed (session 42, commits 15024b3 and cc454a6 have the code): a side stream in the prefill. H100,
    graph prefill of 2,048 tokens (``profile_prefill.py --format int4_cli --graph``, routes with and without it in
    one call): the dense projections' dequantization passes forked as each Mamba mixer started ran beside in_proj's
    GEMM and the conv, which leave no room (178.2k against 178.9k tok/s in line); forked just before the scan they
    slowed it more than they saved (the scan's 36 launches 2,534 -> 2,850 us against the passes' 263 us: 175.3k
    against 178.6k); the W4A8 route's input quantizer beside the MoE's one-program tile map, alone, was level
    (199.3k / 198.4k against 198.8k / 199.9k, two runs each in turn).
    Tried and removed (session 23, commit c3618aa has the code): each MoE block's expert stacks dequantized on a side
    stream while the block before it runs, into one reused buffer, then the float grouped GEMMs. 2,048 tokens, graph
    prefill (``profile_prefill.py --format int4_cli --graph``): 165k tok/s against 156k at a peak of 2.19 against
    1.85 GB (fc2 alone: 160k, 1.97 GB). The pass ran ahead of the block more than beside it; a capped grid of
    66-528 looping programs ran beside it but slowed the scan up to 2x (129k-162k)."""

    int4_word_gemv: bool = True
    binary_word_gemv: bool = True
    binary_word_dots_min_rows: int = 8
    dequant_experts_min_m: int = 1 << 62
    dequant_experts_whole_stack: bool = False
    word_gemv_max_rows: int = 8
    word_gemv_max_weights: int = 1 << 24
    plane_float_codes: bool = True
    plane_weight_left: bool = True
    plane_gemm_tile: tuple = (64, 128, 4, 3)
    plane_code_pairs: str = "exact"
    plane_gemm_code_pairs: str = "scaled"
    gemm_gated_act: bool = True
    w4a8_min_m: int = 0  # from this many rows (0: never), int4 plane words multiply int8 activations (W4A8)
    w4a8_dense: bool = False  # ... also the dense (not routed) matrices, not only the MoE's expert stacks
    w4a8_tile: tuple = (64, 128, 4, 3, True)  # the W4A8 GEMM's (block_m, block_n, warps, stages, W x^T); block_m is
    #                                            also the MoE's rows a tile when its stacks take W4A8
    w4a8_route_quantizes: bool = False  # a W4A8 MoE prefill's routing kernel also quantizes fc1's input (one launch
    #                                    instead of two: fused_moe.route_top1_int8). Off: level on the H100, session 43
    #                                    (profile_prefill.py --format int4_cli --graph --experts w4a8_rq,w4a8,w4a8_rq,
    #                                    w4a8): 198.6k / 197.7k tok/s against 198.8k / 198.8k; the routing kernel
    #                                    grew from 11.6 to 17.8 us a launch (three passes over its row, each waiting on
    #                                    its loads), as much as the quantizer launch it saves
    split_k_atomic_sem: str = "relaxed"  # the split-K atomic adds' ordering ("relaxed" or "acq_rel", Triton's
    #                                      default, which fences every earlier store before each add: sm_90
    #                                      MEMBAR.ALL.GPU + CCTL.IVALL; the sums are only read after the grid)

    def __post_init__(self):
        if self.split_k_atomic_sem not in ("relaxed", "acq_rel"):
            raise ValueError(f"MatmulPolicy: split_k_atomic_sem must be 'relaxed' or 'acq_rel', got "
                             f"{self.split_k_atomic_sem!r}")
        for name in ("plane_code_pairs", "plane_gemm_code_pairs"):
            if getattr(self, name) not in ("", "exact", "scaled"):
                raise ValueError(f"MatmulPolicy: {name} must be '', 'exact' or 'scaled', got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.w4a8_min_m, int) or self.w4a8_min_m < 0:
            raise ValueError(f"MatmulPolicy: w4a8_min_m must be an integer >= 0, got {self.w4a8_min_m!r}")
        if len(self.w4a8_tile) != 5:
            raise ValueError(f"MatmulPolicy: w4a8_tile is (block_m, block_n, warps, stages, weight_left), got "
                             f"{self.w4a8_tile}")
        if len(self.plane_gemm_tile) != 4:
            raise ValueError(f"MatmulPolicy: plane_gemm_tile is (block_m, block_n, warps, stages), got "
                             f"{self.plane_gemm_tile}")

    def takes_w4a8(self, m: int, weight, routed: bool = True) -> bool:
        """Whether ``m`` rows of ``weight`` (a routed expert stack, or a dense matrix) take the W4A8 path
        (``w4a8_min_m``, ``w4a8_dense``)."""
        return (0 < self.w4a8_min_m <= m and (routed or self.w4a8_dense) and isinstance(weight, PackedWeight)
                and weight.fmt == FMT_INT4_PLANES and weight.group_size % INT4_TILE == 0)

    def binary_word_gemv_fits(self, m: int, weight: BinaryWeight) -> bool:
        return self.binary_word_gemv and (m == 1 or (m <= self.word_gemv_max_rows
                                                     and weight.n * weight.k <= self.word_gemv_max_weights))


DEFAULT_POLICY = MatmulPolicy()
_POLICIES = [DEFAULT_POLICY]


def current_policy() -> MatmulPolicy:
    """The policy of matmuls called without one: :data:`DEFAULT_POLICY` unless :func:`using_policy` is active."""
    return _POLICIES[-1]


W4A8_PREFILL_MIN_M = 64  # rows from which int8_activations() sends the MoE's int4 expert stacks to W4A8


@contextmanager
def int8_activations(enabled: bool = True):
    """Within the block (``enabled``), a prefill's int4 plane-word MoE expert matmuls of at least
    :data:`W4A8_PREFILL_MIN_M` rows multiply int8-rounded activations on int8 tensor cores (``MatmulPolicy.w4a8_min_m``
    on the current policy): the CLI's ``--int8-activations``. Decode and the dense projections are unchanged."""
    if not enabled:
        yield current_policy()
        return
    with using_policy(replace(current_policy(), w4a8_min_m=W4A8_PREFILL_MIN_M)) as policy:
        yield policy


@contextmanager
def using_policy(policy: MatmulPolicy):
    """Run the matmuls of a block of code (a model's prefill, say) under ``policy`` (benchmarks compare routes)."""
    _POLICIES.append(policy)
    try:
        yield policy
    finally:
        _POLICIES.pop()


# ---- float / int8 / int4 kernels --------------------------------------------------------------------------------
GEMV_ROWS = 1  # up to this many rows: CUDA-core reduction per row (weight tile reused); above: tensor cores
# (8 was measured on the H100: 5x slower than the 16-row tensor-core tile at batch 8)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def use_dot(self) -> bool:
        return self.block_m > GEMV_ROWS


_SM_COUNT: dict = {}


def sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def small_block_m(m: int) -> int:
    """Rows per program for M <= 16: the next power of two up to GEMV_ROWS (reduction path), else 16 (dot)."""
    if m <= GEMV_ROWS:
        return 1 << max(0, m - 1).bit_length()
    return 16


def pick_config(m: int, weight: PackedWeight, device, route: int = ROUTE_DENSE,
                policy: MatmulPolicy | None = None) -> MatmulConfig:
    """Tile sizes by M: GEMV (M = 1), small-M tensor-core tiles (M <= 16), prefill GEMM tiles (M > 16)."""
    policy = policy or current_policy()
    n, k_pad = weight.n, weight.k_padded
    g = weight.group_size
    if weight.fmt == FMT_INT4:  # one group per tile where the dot allows it (K >= 16 per half-tile)
        block_k = g if g >= 32 else (64 if m == 1 else 32)
    elif weight.fmt == FMT_INT4_PLANES:  # one plane tile (the group is a multiple of it)
        block_k = INT4_TILE
    else:
        block_k = 128 if m <= GEMV_MAX_M else 64
    bm = small_block_m(m)
    if device.type != "cuda":  # interpreter: each program costs Python time, so few large ones (split-K kept)
        bm = bm if m <= GEMV_MAX_M else 32
        return MatmulConfig(bm, 64, block_k, 2 if m <= GEMV_MAX_M and k_pad > 2 * block_k else 1, 1, 1)
    if m == 1 and weight.fmt == FMT_INT4 and policy.int4_word_gemv:  # the word kernel, from the H100 GEMV sweep
        bn = 128 if n >= 16384 else (32 if n <= 2048 else 64)
        programs, groups = cdiv(n, bn), cdiv(k_pad, g)
        split = 1
        while programs * split < 4 * sm_count(device) and split < 8 and split * 2 <= groups:
            split *= 2
        return MatmulConfig(1, bn, g, split, 2 if n >= 8192 else 4, 3)
    if m <= GEMV_MAX_M:
        bn = 128 if n >= 4096 and bm <= 2 else 64
        programs = cdiv(n, bn)
        split = 1
        k_tiles = cdiv(k_pad, block_k)
        while programs * split < 2 * sm_count(device) and split < 8 and split * 2 <= max(1, k_tiles // 2):
            split *= 2
        if route == ROUTE_BY_EXPERT:  # most expert columns are idle: fill from the per-token experts only
            split = min(split, 4)
        return MatmulConfig(bm, bn, block_k, split, 4, 3)
    return gemm_config(m, weight, device, policy)


def gemm_config(m: int, weight: PackedWeight, device, policy: MatmulPolicy | None = None) -> MatmulConfig:
    """Tiles of the prefill GEMM kernel (M > 16), from the H100 sweep (benchmarks/results_tables_h100.md, "Prefill
    GEMM sweep"): up to 64 rows the GEMM is bandwidth-bound (narrow tiles, split-K while the grid is small), above it
    64 x 128 and then 128 x 128 tiles; int4 plane words above 64 rows: ``policy.plane_gemm_tile``."""
    g = weight.group_size
    int4 = weight.fmt in (FMT_INT4, FMT_INT4_PLANES)
    block_k = INT4_TILE if weight.fmt == FMT_INT4_PLANES else (g if g >= 64 else 64) if int4 else 64
    if device.type != "cuda":
        return MatmulConfig(32, 64, block_k, 1, 1, 1)
    if m <= 64:
        bm, bn = (32 if m <= 32 else 64), 64
        block_k = block_k if int4 else 128
        programs = cdiv(m, bm) * cdiv(weight.n, bn)
        k_tiles = cdiv(weight.k_padded, block_k)
        split = 1
        while programs * split < sm_count(device) and split < 4 and split * 2 <= k_tiles // 16:  # long K only
            split *= 2
        return MatmulConfig(bm, bn, block_k, split, 4, 4)
    if weight.fmt == FMT_INT4_PLANES:  # the grouped expert GEMM of the MoE prefill (MatmulPolicy.plane_gemm_tile)
        policy = policy or current_policy()
        bm, bn, warps, stages = policy.plane_gemm_tile
        return MatmulConfig(bm, bn, block_k, 1, warps, stages)
    if m <= 256:
        return MatmulConfig(64, 128, block_k, 1, 4, 3 if int4 else 4)
    return MatmulConfig(128, 128, block_k, 1, 8, 3 if int4 else 4)


DEQUANT_GEMM_MIN_M = {FMT_INT4: GEMV_MAX_M + 1, FMT_INT4_PLANES: GEMV_MAX_M + 1, FMT_INT8: 512}
# On CUDA, dense weights, from this many rows: one Triton dequantization pass to x.dtype, then cuBLAS; it costs a
# dense temporary of one matrix. Routed experts stay on the tile kernel. int8: from the H100 GEMM sweep. int4: the
# H200 run of session 12 (benchmarks/raw/h200_session12/run1_planes.log) timed the tile GEMM at M = 64 at 2-6x
# cuBLAS on in_proj / x_proj / out_proj (23.6 / 41.4 / 42.7 us against 7.6 / 7.0 / 8.5), while the pass itself
# costs ~7.8 / 1.9 / 4.4 us there (M = 256: pass + cuBLAS minus cuBLAS alone), so every M above the small-M
# kernels takes the pass (the head at M = 64 loses ~20%; prefill computes it on the last position only).


# ---- 1-bit kernels ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinaryConfig:
    """Tiles; for the M = 1 word kernel ``block_k`` is the columns per iteration (32 per word) and ``split_k`` the
    number of K slices accumulated with atomics (the other kernels take ``split_k = 1``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


BINARY_DEQUANT_GEMM_MIN_M = GEMV_MAX_M + 1  # CUDA, M from this: one dequantization pass + cuBLAS / the float GEMM


def binary_word_dots_tile(n: int, k: int, row_blocks: int, device) -> tuple[int, int, int]:
    """``(weight rows a program, warps, K splits)`` of the 1-bit bit-position dots for ``row_blocks`` program rows
    (tiles of 16 input rows): 64 weight rows and 4 warps on CUDA (one warpgroup's tensor-core tile),
    split along K (512-column tiles) until the busy programs reach twice the multiprocessors; 64 rows, one warp, no
    split on the interpreter."""
    if device.type != "cuda":
        return 64, 1, 1
    programs, tiles, split = row_blocks * cdiv(n, 64), cdiv(k, 512), 1
    while programs * split < 2 * sm_count(device) and split * 2 <= tiles:
        split *= 2
    return 64, 4, split


def pick_binary_config(m: int, weight: BinaryWeight, device,
                       policy: MatmulPolicy | None = None) -> BinaryConfig:
    """The word GEMV (M = 1, and small matrices up to ``policy.word_gemv_max_rows`` rows), small-M tensor-core tiles
    (M <= 16) or GEMM tiles; few big programs on the interpreter."""
    policy = policy or current_policy()
    if device.type != "cuda":
        if policy.binary_word_gemv_fits(m, weight):
            return BinaryConfig(1, 32, 64, 1, 1)
        return BinaryConfig(1 if m == 1 else (16 if m <= GEMV_MAX_M else 32), 32, 64, 1, 1)
    if policy.binary_word_gemv_fits(m, weight):  # word kernel: H200 sweep, benchmarks/results_tables_h200.md
        n, words = weight.n, cdiv(weight.k, 32)
        bn, wpi = (256 if n >= 8192 else 64), 8
        programs, iters = m * cdiv(n, bn), cdiv(words, wpi)
        split = 1
        while programs * split < 2 * sm_count(device) and split < 4 and split * 2 <= iters:
            split *= 2
        return BinaryConfig(1, bn, 32 * wpi, 4, 3, split)
    if m == 1:
        return BinaryConfig(1, 32, 256, 4, 3)
    if m <= GEMV_MAX_M:
        return BinaryConfig(16, 64, 128, 4, 3)
    return BinaryConfig(64 if m <= 128 else 128, 128, 64, 8 if m > 128 else 4, 3)
