"""How the rows of a matmul find their weights, shared by the int8/int4/float and the 1-bit kernels:

* ``ROUTE_DENSE``: one matrix for every row;
* ``ROUTE_BY_EXPERT`` (decode MoE): one program column per expert reads only the rows routed to it; experts with no
  rows run an empty loop, no host sync, graph-capturable;
* ``ROUTE_TILES`` (prefill MoE): tokens sorted by expert into tiles of ``block_m`` rows (:func:`expert_tile_map`),
  a grouped GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.kernels._triton import cdiv

ROUTE_DENSE, ROUTE_BY_EXPERT, ROUTE_TILES = 0, 1, 2


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
