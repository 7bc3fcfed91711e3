"""The grouped-GEMM tile map: the one-program Triton kernel equals its PyTorch twin tensor for tensor (sorted rows,
each tile's expert and row range, the empty tiles), and every row lands in exactly one tile of its expert."""

import pytest
import torch

from qmamba.kernels.routing import expert_tile_map, expert_tile_map_ref, expert_tile_map_triton


def _assert_same(a, b):
    for name in ("sorted_ids", "tile_expert", "tile_lo", "tile_hi"):
        assert torch.equal(getattr(a, name).cpu().long(), getattr(b, name).cpu().long()), name
    assert a.block_m == b.block_m


@pytest.mark.parametrize("m,experts,block_m", [(9, 4, 2), (1, 8, 16), (300, 8, 16), (700, 3, 64), (2, 5, 4),
                                              (2500, 8, 64)])  # 2500: three blocks of the largest size
def test_triton_tile_map_equals_reference(m, experts, block_m, device):
    g = torch.Generator().manual_seed(m)
    idx = torch.randint(0, experts, (m,), generator=g)
    if m > 2:
        idx[idx == 1] = 0  # an expert with no rows
    idx = idx.to(device=device, dtype=torch.int32)
    got = expert_tile_map_triton(idx, experts, block_m)
    _assert_same(got, expert_tile_map_ref(idx, experts, block_m))
    seen = []
    for e, lo, hi in zip(got.tile_expert.tolist(), got.tile_lo.tolist(), got.tile_hi.tolist()):
        assert 0 <= e < experts and 0 <= hi - lo <= block_m
        rows = got.sorted_ids[lo:hi].tolist()
        assert all(int(idx[r]) == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(m))


def test_dispatch_by_device(device):
    idx = torch.tensor([2, 0, 2], device=device, dtype=torch.int32)
    _assert_same(expert_tile_map(idx, 3, 2), expert_tile_map_ref(idx, 3, 2))
