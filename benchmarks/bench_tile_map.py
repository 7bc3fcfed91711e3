"""The prefill MoE's tile map (``qmamba.kernels.routing.expert_tile_map_triton``: one program sorts the rows by
expert and lays out the grouped GEMM's tiles) by rows a block, side by side in one run.

    python benchmarks/bench_tile_map.py [--rows 256,512,1024,2048,4096] [--blocks 256,1024] [--experts 8]
        [--block-m 64] [--json OUT]

Each block size is the kernel's largest (``routing.TILE_MAP_MAX_BLOCK``; 256 before session 36, 1,024 since). Every
map is compared with the PyTorch twin's (``expert_tile_map_ref``) before it is timed; a mismatch exits 1. Routing is
uniform at random (seed 0). Timing: benchmarks/timing.py (CUDA-graph replay, median).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qmamba.kernels import routing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import require_idle_gpu, time_calls  # noqa: E402


def ints(arg: str) -> list[int]:
    return [int(v) for v in arg.split(",") if v]


def same_map(a, b) -> bool:
    return all(torch.equal(getattr(a, k).long().cpu(), getattr(b, k).long().cpu())
               for k in ("sorted_ids", "tile_expert", "tile_lo", "tile_hi"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,512,1024,2048,4096")
    ap.add_argument("--blocks", default="256,1024", help="the kernel's largest rows a block, each timed in turn")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--block-m", type=int, default=64, help="the grouped GEMM's tile rows")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_tile_map.py times CUDA kernels; no CUDA device here")
    require_idle_gpu()
    gen = torch.Generator().manual_seed(0)
    results, default = [], routing.TILE_MAP_MAX_BLOCK
    print(f"{'rows':>6} " + " ".join(f"{'max ' + str(b):>10}" for b in ints(args.blocks)) + "   (us a map)")
    try:
        for m in ints(args.rows):
            idx = torch.randint(0, args.experts, (m,), generator=gen).to("cuda", torch.int32)
            ref = routing.expert_tile_map_ref(idx, args.experts, args.block_m)
            row = dict(rows=m, us={})
            for block in ints(args.blocks):
                routing.TILE_MAP_MAX_BLOCK = block
                got = routing.expert_tile_map_triton(idx, args.experts, args.block_m)
                if not same_map(got, ref):
                    print(f"error: the tile map at {m} rows, blocks of up to {block}, differs from the PyTorch twin's",
                          file=sys.stderr)
                    return 1
                row["us"][block] = time_calls([lambda: routing.expert_tile_map_triton(idx, args.experts,
                                                                                     args.block_m)], reps=7)
            results.append(row)
            print(f"{m:6d} " + " ".join(f"{row['us'][b]:10.2f}" for b in ints(args.blocks)))
    finally:
        routing.TILE_MAP_MAX_BLOCK = default
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), experts=args.experts,
                                                   block_m=args.block_m, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
