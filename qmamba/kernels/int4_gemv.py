"""The int4 GEMV for one activation row (decode, M = 1) on 32-bit words of the packed weight; the general int4
matmul (:func:`qmamba.kernels.quant_matmul.dequant_matmul`) takes it on CUDA when :class:`MatmulPolicy` allows
(``int4_word_gemv``) and the packed rows are whole aligned words (:func:`qmamba.kernels.weights.int32_words`).
"""

from __future__ import annotations

from qmamba.kernels._triton import cdiv, jit, split_k_mode, split_k_range, store_or_add, tl
from qmamba.kernels.weights import PackedWeight


@jit
def _int4_gemv_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, rscale_ptr, rexp_ptr, N, K, K_PAD, sxk, son, swe, swn, sse, ssn,
    sze, szn, BY_EXPERT: tl.constexpr, GROUP: tl.constexpr, WORDS: tl.constexpr, GPI: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RSCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """int4 GEMV for one row (decode): the packed weight is read as 32-bit words (8 codes each) and each code becomes
    an fp32 without an int-to-float conversion: ``bits(code | 0x4B000000) = 2^23 + code``, so one subtraction of
    ``2^23 + zero point`` gives ``code - zero`` exactly. Each iteration reads ``GPI`` whole groups of ``BLOCK_N``
    rows (``WORDS = GROUP / 8`` words each); group scales multiply the per-group row sums. ``BY_EXPERT``: program
    column e computes only if the row is routed to expert e (decode MoE)."""
    pid_e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if BY_EXPERT:
        expert = pid_e
        active = tl.load(rexp_ptr) == expert
    else:
        expert = pid_e * 0
        active = pid_e == 0
    e64 = expert.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    j = tl.arange(0, WORDS)
    gi = tl.arange(0, GPI)
    n_groups = K_PAD // GROUP
    iters = tl.cdiv(n_groups, GPI)
    it_lo, it_hi = split_k_range(pid_k, iters, SPLIT_K)
    it_hi = tl.where(active, it_hi, it_lo)
    w_rows = w_ptr + e64 * swe + n[:, None, None] * swn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        grp = it * GPI + gi                                                                  # [GPI]
        g_ok = grp < n_groups
        wmask = n_ok[:, None, None] & g_ok[None, :, None]
        word = tl.load(w_rows + (grp * WORDS)[None, :, None] + j[None, None, :], mask=wmask, other=0)
        gmask = n_ok[:, None] & g_ok[None, :]
        zb = tl.load(z_ptr + e64 * sze + n[:, None] * szn + (grp // 2)[None, :], mask=gmask, other=0).to(tl.int32)
        zbias = ((zb >> ((grp % 2) * 4)[None, :]) & 0xF).to(tl.float32) + 8388608.0                  # [BN, GPI]
        scale = tl.load(s_ptr + e64 * sse + n[:, None] * ssn + grp[None, :], mask=gmask, other=0.0).to(tl.float32)
        kb = grp[:, None] * GROUP + 8 * j[None, :]                                           # [GPI, WORDS]
        part = tl.zeros((BLOCK_N, GPI, WORDS), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + (kb + i) * sxk, mask=(kb + i < K) & g_ok[:, None], other=0.0).to(tl.float32)
            code = ((word >> (4 * i)) & 0xF) | 0x4B000000
            part += (code.to(tl.float32, bitcast=True) - zbias[:, :, None]) * xi[None, :, :]
        acc += tl.sum(tl.sum(part, axis=2) * scale, axis=1)
    if HAS_BIAS:
        acc += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_RSCALE:
        acc = acc * tl.load(rscale_ptr).to(tl.float32)
    mask = n_ok & ((tl.zeros((BLOCK_N,), dtype=tl.int32) + active.to(tl.int32)) > 0)  # a vector mask (interpreter)
    store_or_add(out_ptr + n * son, acc, mask, ATOMIC)


def int4_gemv(x, words, weight: PackedWeight, out, bias, row_scale, row_expert, config, atomic: bool,
              atomic_sem: str = "relaxed"):
    """``out [1, N] <- x [1, K] @ W^T`` (+ ``bias``, * ``row_scale``) with ``words`` the int32 view of
    ``weight.qweight``. ``row_expert`` (one id) picks the expert of a stack (one program column per expert, only the
    routed one computes); None: one matrix. ``atomic``: split-K into a zeroed float32 ``out`` (``atomic_sem``: the
    adds' ordering, ``MatmulPolicy.split_k_atomic_sem``)."""
    s, z, dummy = weight.scales, weight.zeros, x
    by_expert = row_expert is not None
    _int4_gemv_kernel[(weight.n_experts if by_expert else 1, cdiv(weight.n, config.block_n), config.split_k)](
        x, out, words, s, z, bias if bias is not None else dummy,
        row_scale if row_scale is not None else dummy, row_expert if row_expert is not None else dummy,
        weight.n, weight.k, weight.k_padded, x.stride(1), out.stride(1), words.stride(0), words.stride(1),
        s.stride(0), s.stride(1), z.stride(0), z.stride(1), BY_EXPERT=by_expert,
        GROUP=weight.group_size, WORDS=weight.group_size // 8,
        GPI=max(1, config.block_k // weight.group_size), SPLIT_K=config.split_k, HAS_BIAS=bias is not None,
        HAS_RSCALE=row_scale is not None, ATOMIC=split_k_mode(atomic, atomic_sem), BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages)
