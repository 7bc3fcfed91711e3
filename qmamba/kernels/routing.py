"""How the rows of a matmul find their weights, shared by the int8/int4/float and the 1-bit kernels:

* ``ROUTE_DENSE``: one matrix for every row;
* ``ROUTE_BY_EXPERT`` (decode MoE): one program column per expert reads only the rows routed to it; experts with no
  rows run an empty loop, no host sync, graph-capturable;
* ``ROUTE_TILES`` (prefill MoE): tokens sorted by expert into tiles of ``block_m`` rows (:func:`expert_tile_map`),
  a grouped GEMM.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from qmamba.kernels._triton import HAS_TRITON, cdiv, jit, next_pow2, tl

ROUTE_DENSE, ROUTE_BY_EXPERT, ROUTE_TILES = 0, 1, 2


@jit
def swizzled_program(pid, GRID_M, GRID_N, SWIZZLE: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` of a ``GRID_M x GRID_N`` GEMM grid launched flat, in groups of
    ``SWIZZLE`` row tiles (column-major within a group), so that neighbouring programs share weight tiles in L2."""
    per_group = SWIZZLE * GRID_N
    first_m = (pid // per_group) * SWIZZLE
    group_rows = tl.minimum(GRID_M - first_m, SWIZZLE)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@jit
def program_rows(pid_m, M, rexp_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, sorted_ptr, ROUTE: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """The input rows of program row ``pid_m`` of a routed matmul: ``(rows [BLOCK_M], row_ok [BLOCK_M], expert)``.
    ``ROUTE_DENSE``: row tile ``pid_m`` of ``M`` rows, expert 0; ``ROUTE_BY_EXPERT``: the first ``BLOCK_M`` rows,
    those whose ``row_expert`` (``rexp_ptr``) is ``pid_m``; ``ROUTE_TILES``: tile ``pid_m`` of the
    :class:`ExpertTiles` map (its rows of ``sorted_ids``)."""
    rm = tl.arange(0, BLOCK_M)
    if ROUTE == 0:
        rows = pid_m * BLOCK_M + rm
        row_ok = rows < M
        expert = pid_m * 0
    elif ROUTE == 1:
        rows = rm
        expert = pid_m
        ids = tl.load(rexp_ptr + rows, mask=rows < M, other=-1)
        row_ok = ids == expert
    else:
        expert = tl.load(tile_e_ptr + pid_m)
        lo = tl.load(tile_lo_ptr + pid_m)
        hi = tl.load(tile_hi_ptr + pid_m)
        row_ok = lo + rm < hi
        rows = tl.load(sorted_ptr + lo + rm, mask=row_ok, other=0)
    return rows, row_ok, expert


@dataclass
class ExpertTiles:
    """Tokens sorted by expert, cut into tiles of ``block_m`` rows that never straddle two experts.

    ``tile_expert/tile_lo/tile_hi [n_tiles]`` int32: tile t covers ``sorted_ids[tile_lo[t]:tile_hi[t]]`` of expert
    ``tile_expert[t]``; unused tiles (the bound is static: ceil(M / block_m) + E) are empty. Built on the device
    with no host synchronisation.
    """

    sorted_ids: torch.Tensor
    tile_expert: torch.Tensor
    tile_lo: torch.Tensor
    tile_hi: torch.Tensor
    block_m: int

    @property
    def n_tiles(self) -> int:
        return self.tile_expert.numel()

    def tensors(self):
        return self.tile_expert, self.tile_lo, self.tile_hi, self.sorted_ids


def expert_tile_map(row_expert: torch.Tensor, n_experts: int, block_m: int) -> ExpertTiles:
    """The tiles of a grouped GEMM over ``row_expert [M]`` (see :class:`ExpertTiles`): on CUDA one Triton program
    (:func:`expert_tile_map_triton`; a prefill calls this once per MoE layer, and the PyTorch twin is ~30 small
    launches), elsewhere :func:`expert_tile_map_ref`."""
    if row_expert.is_cuda and HAS_TRITON and not _TILE_MAP_KERNEL_FAILED:
        try:
            return expert_tile_map_triton(row_expert, n_experts, block_m)
        except Exception as exc:  # noqa: BLE001 - a Triton that cannot build it: the twin gives the same tiles
            _TILE_MAP_KERNEL_FAILED.append(exc)
            warnings.warn(f"expert_tile_map: the Triton kernel failed ({type(exc).__name__}: {exc}); using the "
                          "PyTorch twin from now on", RuntimeWarning, stacklevel=2)
    return expert_tile_map_ref(row_expert, n_experts, block_m)


_TILE_MAP_KERNEL_FAILED: list = []  # the exception, once the kernel failed on this process's Triton


def expert_tile_map_ref(row_expert: torch.Tensor, n_experts: int, block_m: int) -> ExpertTiles:
    """PyTorch twin of :func:`expert_tile_map_triton` (a stable sort by expert, then prefix sums)."""
    m = row_expert.numel()
    idx = row_expert.long()
    sorted_ids = torch.argsort(idx, stable=True).to(torch.int32)
    counts = torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tiles_per = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per, 0)
    t = torch.arange(cdiv(m, block_m) + n_experts, device=idx.device)
    e = torch.searchsorted(tile_end, t, right=True)
    used = e < n_experts
    ec = e.clamp(max=n_experts - 1)
    lo = starts[ec] + (t - (tile_end[ec] - tiles_per[ec])) * block_m
    hi = torch.minimum(lo + block_m, ends[ec])
    lo = torch.where(used, lo, torch.zeros_like(lo))
    hi = torch.where(used, hi, torch.zeros_like(hi))
    return ExpertTiles(sorted_ids, ec.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32), block_m)


@jit
def _expert_tile_map_kernel(e_ptr, sorted_ptr, te_ptr, lo_ptr, hi_ptr, M, E, T, BLOCK_M_TILE,
                            EP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: expert counts, their prefix sums, a stable counting sort of the rows by expert, then each tile's
    expert and row range (unused tiles: the last expert, an empty range), as :func:`expert_tile_map_ref`."""
    ex = tl.arange(0, EP)
    counts = tl.zeros((EP,), dtype=tl.int32)
    for start in range(0, M, BLOCK):
        r = start + tl.arange(0, BLOCK)
        e = tl.load(e_ptr + r, mask=r < M, other=-1)
        counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    tiles_per = (counts + BLOCK_M_TILE - 1) // BLOCK_M_TILE
    tile_end = tl.cumsum(tiles_per, axis=0)
    # stable counting sort: a row's place is its expert's start, the rows of that expert in earlier blocks, and
    # those before it in its own block
    seen = tl.zeros((EP,), dtype=tl.int32)
    for start in range(0, M, BLOCK):
        r = start + tl.arange(0, BLOCK)
        e = tl.load(e_ptr + r, mask=r < M, other=-1)
        hot = (e[:, None] == ex[None, :]).to(tl.int32)                                         # [BLOCK, EP]
        before = tl.cumsum(hot, axis=0) - hot
        place = tl.sum(hot * (starts + seen)[None, :] + hot * before, axis=1)
        tl.store(sorted_ptr + place, r, mask=r < M)
        seen += tl.sum(hot, axis=0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        et = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32) * (ex[None, :] < E).to(tl.int32), axis=1)
        used = et < E
        ec = tl.minimum(et, E - 1)
        pick = ec[:, None] == ex[None, :]                                                       # [BLOCK_T, EP]
        start_e = tl.sum(tl.where(pick, starts[None, :], 0), axis=1)
        end_e = tl.sum(tl.where(pick, ends[None, :], 0), axis=1)
        first_tile = tl.sum(tl.where(pick, (tile_end - tiles_per)[None, :], 0), axis=1)
        lo = start_e + (t - first_tile) * BLOCK_M_TILE
        hi = tl.minimum(lo + BLOCK_M_TILE, end_e)
        tm = t < T
        tl.store(te_ptr + t, ec, mask=tm)
        tl.store(lo_ptr + t, tl.where(used, lo, 0), mask=tm)
        tl.store(hi_ptr + t, tl.where(used, hi, 0), mask=tm)


def expert_tile_map_triton(row_expert: torch.Tensor, n_experts: int, block_m: int) -> ExpertTiles:
    """Triton twin of :func:`expert_tile_map_ref`: the same tensors, one launch, no host synchronisation."""
    m = row_expert.numel()
    idx = row_expert.reshape(-1).to(torch.int32).contiguous()
    n_tiles = cdiv(m, block_m) + n_experts
    dev = row_expert.device
    sorted_ids = torch.empty(m, device=dev, dtype=torch.int32)
    tile_expert, tile_lo, tile_hi = (torch.empty(n_tiles, device=dev, dtype=torch.int32) for _ in range(3))
    _expert_tile_map_kernel[(1,)](idx, sorted_ids, tile_expert, tile_lo, tile_hi, m, n_experts, n_tiles, block_m,
                                  **tile_map_launch(n_experts, dev.type == "cuda", m))
    return ExpertTiles(sorted_ids, tile_expert, tile_lo, tile_hi, block_m)


TILE_MAP_MAX_BLOCK = 1024


def tile_map_launch(n_experts: int, cuda: bool, rows: int = 0) -> dict:
    """Meta-parameters of the tile-map kernel: rows read ``BLOCK`` at a time (a ``[BLOCK, experts]`` one-hot a block),
    ``BLOCK`` the rows' power of two between 256 and :data:`TILE_MAP_MAX_BLOCK`, with 4 warps up to 512 rows and 8
    above. One program walks the rows twice (counts, then places), and each block is a few dependent global and
    shared-memory round trips: 256 rows a block made a 2,048-row prefill 16 blocks, ~17 us a MoE layer on the H100
    (session 35's profile, 307 us of the graph prefill's 11.9 ms); 1,024 make it 4. H100, session 36
    (``benchmarks/bench_tile_map.py``), us a map at 1,024 / 2,048 / 4,096 rows: 9.7 / 17.5 / 33.0 in blocks of 256,
    6.1 / 9.9 / 17.8 in blocks of 1,024 (512: 7.1 / 12.2 / 22.5)."""
    block = min(max(next_pow2(max(rows, 1)), 256), TILE_MAP_MAX_BLOCK)
    warps = (4 if block <= 512 else 8) if cuda else 1
    return dict(EP=next_pow2(max(n_experts, 2)), BLOCK=block, BLOCK_T=128, num_warps=warps)
