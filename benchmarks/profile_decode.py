"""Where a decode step's time goes (run on the GPU): the fused single-token step of a random-weight preset, per
kernel, from the PyTorch profiler (CUPTI kernel records of eager steps; a CUDA graph replays the same kernels).

    python benchmarks/profile_decode.py --preset blackmamba-2.8b --format int4_g128 [--batch 1] [--out prof.json]

Formats: those of bench_e2e.py (bf16, int8, int4_g128, binary+int4_g128).

Prints, per kernel name: launches per step, GPU microseconds per step and per launch; the sum of kernel time per
step beside the replayed graph's wall time per step (the difference is the gaps between graph nodes). First the step
is checked (``--check-steps``, as bench_decode.py checks it: the graph step's greedy tokens in float32 equal to the
eager reference path's); a failed check exits 1 before anything is profiled. As bench_decode.py times it, the
model takes int8 activations where the policy runs the experts on int8 codes (``DecodePolicy.int8_rows``: what a
checkpoint that passed ``qmamba quantize``'s int8 check loads with; before session 48 the profile left them off and
showed the float-input experts at batch 2+).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qmamba.config import preset
from qmamba.cuda_graph import GraphDecoder
from qmamba.fused_step import FusedDecodeStep
from qmamba.kernels.decode_policy import DecodePolicy
from qmamba.kernels.matmul_configs import using_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import check_fp32, int8_activations, matmul_variant, policy_variant, time_graph  # noqa: E402
from bench_e2e import FORMATS, build  # noqa: E402
from timing import cuda_kernel_times, event_us, require_idle_gpu  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--format", default="int4_g128", choices=sorted(FORMATS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant", default="default", help="a policy variant of bench_decode.py's --variants")
    ap.add_argument("--check-steps", type=int, default=8, help="greedy steps checked first (at least 1)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.check_steps < 1:
        sys.exit("error: --check-steps must be at least 1: a profile of an unchecked step is not a result")
    require_idle_gpu()
    policy = policy_variant(DecodePolicy.for_device(torch.device("cuda")), args.variant)
    failures = []
    check_fp32(preset(args.preset), args.format, [args.batch], args.check_steps, {args.variant: policy},
               lambda s: print(s, flush=True), failures)
    if failures:
        sys.exit("FAILED:\n  " + "\n  ".join(failures))
    general = matmul_variant(args.variant)  # the general matmuls' policy of the variant (default: the default)
    with using_policy(general):
        model = build(preset(args.preset), args.format)
    with using_policy(general), int8_activations(model, policy.int8_rows, policy.int8_rows_fc2):
        step = FusedDecodeStep(model, policy)
        state = model.new_state(args.batch)
        ids = torch.randint(0, model.config.vocab_size, (args.batch,), device="cuda")
        for _ in range(3):
            step(ids, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step(ids, state)
            torch.cuda.synchronize()
    per_name = cuda_kernel_times(prof)
    # the kernels of the last step in launch order: which matrix each linear kernel is follows from its position
    kernel_events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                           key=lambda e: e.time_range.start)
    per_step = len(kernel_events) // args.steps
    last = kernel_events[-per_step:]
    print("last step, first 12 kernels in order (us):",
          ", ".join(f"{e.name[:24]}={event_us(e):.2f}"
                    for e in last[:12]))
    rows = sorted(((name, calls / args.steps, us / args.steps) for name, (calls, us) in per_name.items()),
                  key=lambda r: -r[2])
    kernel_us = sum(r[2] for r in rows)
    with using_policy(general), int8_activations(model, policy.int8_rows, policy.int8_rows_fc2):
        # graphs capture the matmul policy active at capture
        graph_ms = time_graph(GraphDecoder(model, policy=policy), args.batch)
    print(f"{args.preset} {args.format} batch {args.batch} {args.variant}: kernels {kernel_us:.0f} us/step "
          f"({sum(r[1] for r in rows):.0f} launches), graph replay {graph_ms * 1e3:.0f} us/step")
    for name, calls, us in rows:
        print(f"{us:9.1f} us/step {calls:6.1f} launches {us / calls:7.2f} us each  {name[:90]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(preset=args.preset, format=args.format, batch=args.batch, kernel_us_per_step=kernel_us,
                           graph_us_per_step=graph_ms * 1e3,
                           kernels=[dict(name=n, launches=c, us=u) for n, c, u in rows],
                           last_step=[dict(name=e.name[:60], start_us=e.time_range.start - last[0].time_range.start,
                                           us=event_us(e))
                                      for e in last]), f, indent=1)


if __name__ == "__main__":
    main()
