"""Where a prefill's time goes (run on the GPU): one prefill of a random-weight preset (the head on the last
position, as ``qmamba bench`` times it), per kernel, from the PyTorch profiler.

    python benchmarks/profile_prefill.py --format int4_g128 [--prompt-len 2048] [--batch 1] [--graph]
        [--experts tiles,whole_stack] [--out prof.json]

Formats: those of bench_e2e.py. int4 weights are held as plane words, as ``load_model`` holds them on CUDA. Prints
per kernel name: launches, GPU microseconds per prefill, share of the total; and the prefill's wall time (median of
5). ``--graph``: also the CUDA-graph chunked prefill (qmamba/graph_prefill.py), checked against the eager prefill
first (next token and final state, ``qmamba.bench.check_prefill``; a failed check exits non-zero), its wall time
beside the eager one's, and the kernels of a graph replay. ``--experts``: each route of the routed expert matmuls in
turn (``whole_stack``: every expert dequantized in one pass, then the float grouped GEMM). Each route also prints
its peak GPU memory (``torch.cuda.max_memory_allocated`` over its runs, graphs included), and each path the grouped
expert GEMMs' time split into fc1 and fc2 (:func:`expert_gemm_split`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qmamba.config import preset
from qmamba.kernels.matmul_configs import using_policy
from qmamba.quant.modules import use_plane_words

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import FORMATS, PREFILL_EXPERT_ROUTES, build  # noqa: E402
from timing import cuda_kernel_times, kernel_launch_us, require_idle_gpu  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by the tests, against the invocations in scripts/gpu_pending.sh)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--format", default="int4_g128", choices=sorted(FORMATS))
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--graph", action="store_true", help="also the CUDA-graph chunked prefill, checked first")
    ap.add_argument("--experts", default="tiles", help="comma-separated routes of the routed int8/int4 expert "
                    f"matmuls, each profiled in turn: {', '.join(PREFILL_EXPERT_ROUTES)} (bench_e2e.py)")
    ap.add_argument("--out")
    return ap


def expert_routes(arg: str) -> list[str]:
    """``--experts``' routes, each a key of ``PREFILL_EXPERT_ROUTES`` (else exit with the known ones)."""
    routes = arg.split(",")
    unknown = [r for r in routes if r not in PREFILL_EXPERT_ROUTES]
    if unknown:
        sys.exit(f"error: unknown expert route(s) {unknown}: {', '.join(PREFILL_EXPERT_ROUTES)}")
    return routes


@torch.no_grad()
def main():
    args = build_parser().parse_args()
    routes = expert_routes(args.experts)
    require_idle_gpu()
    model = build(preset(args.preset), args.format)
    use_plane_words(model)  # as load_model holds int4 on CUDA
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    report = dict(format=args.format, paths={})
    for route in routes:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with using_policy(PREFILL_EXPERT_ROUTES[route]):  # graphs capture the route active while they are captured
            profile_route(args, model, ids, route, report)
        peak = torch.cuda.max_memory_allocated() / 1e9
        print(f"{args.format} ({route}): peak GPU memory {peak:.3f} GB (weights and every graph of this route)")
        report.setdefault("peak_gb", {})[route] = peak
    if args.out:
        Path(args.out).write_text(json.dumps(report))


def profile_route(args, model, ids, route, report):
    paths = {f"eager, {route}": lambda: model.prefill(ids, check=False, last_only=True)}
    if args.graph:
        from qmamba.bench import BenchCheckError, check_prefill
        from qmamba.graph_prefill import GraphPrefill

        graph_prefill = GraphPrefill(model)
        try:
            print(f"{args.format} ({route}): graph prefill check {check_prefill(model, graph_prefill, ids)}")
        except BenchCheckError as exc:
            sys.exit(f"error: {exc}")
        paths[f"graph, {route}"] = lambda: graph_prefill.prefill(ids)
    for path, run in paths.items():
        for _ in range(2):  # compile and warm up
            run()
        torch.cuda.synchronize()
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e6)
        wall_us = statistics.median(walls)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        per = cuda_kernel_times(prof)
        total = sum(us for _, us in per.values())
        print(f"{args.format} ({path}): prefill {args.batch} x {args.prompt_len} wall {wall_us:.0f} us, kernel time "
              f"{total:.0f} us ({args.batch * args.prompt_len / wall_us * 1e6:,.0f} tok/s)")
        rows = sorted(per.items(), key=lambda kv: -kv[1][1])
        for name, (calls, us) in rows[:args.top]:
            print(f"{us:10.0f} us {100 * us / total:5.1f}% {calls:5d} x  {name[:110]}")
        split = expert_gemm_split(kernel_launch_us(prof, EXPERT_GEMM_KERNEL), moe_layers(model))
        if split:
            print(f"{'':10} expert GEMMs: fc1 {split['fc1_us']:.0f} us, fc2 {split['fc2_us']:.0f} us "
                  f"({split['layers']} MoE layers, {EXPERT_GEMM_KERNEL} launches taken in turn)")
        report["paths"][path] = dict(wall_us=wall_us, walls_us=walls, total_us=total, expert_gemms=split,
                                     kernels=[dict(name=n, calls=c, us=u) for n, (c, u) in rows])


EXPERT_GEMM_KERNEL = "_dequant_gemm_kernel"


def moe_layers(model) -> int:
    """The model's MoE blocks (:func:`qmamba.block_plan.block_plan`)."""
    from qmamba.block_plan import block_plan

    return sum(not spec.is_mamba for spec in block_plan(model.config))


def expert_gemm_split(launch_us: list[float], layers: int) -> dict | None:
    """fc1's and fc2's shares of the grouped expert GEMM's time: at M > 16 the dense projections run on cuBLAS (a
    float weight, or int4 / int8 dequantized in one pass first), so the GEMM kernel's launches are the ``layers`` MoE
    blocks' fc1, fc2, fc1, fc2, ... in launch order. None where there are not two launches a layer (the per-expert
    routes launch it once an expert)."""
    if not layers or len(launch_us) != 2 * layers:
        return None
    return dict(layers=layers, fc1_us=sum(launch_us[0::2]), fc2_us=sum(launch_us[1::2]))


if __name__ == "__main__":
    main()
