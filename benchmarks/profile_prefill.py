"""Where a prefill's time goes (run on the GPU): one prefill of a random-weight preset (the head on the last
position, as ``qmamba bench`` times it), per kernel, from the PyTorch profiler.

    python benchmarks/profile_prefill.py --format int4_g128 [--prompt-len 2048] [--batch 1] [--out prof.json]

Formats: those of bench_e2e.py. int4 weights are held as plane words, as ``load_model`` holds them on CUDA. Prints
per kernel name: launches, GPU microseconds per prefill, share of the total; and the prefill's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qmamba.config import preset
from qmamba.quant.modules import use_plane_words

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import FORMATS, build  # noqa: E402
from timing import cuda_kernel_times, require_idle_gpu  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--format", default="int4_g128", choices=sorted(FORMATS))
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    require_idle_gpu()
    model = build(preset(args.preset), args.format)
    use_plane_words(model)  # as load_model holds int4 on CUDA
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    for _ in range(2):  # compile and warm up
        model.prefill(ids, check=False, last_only=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.prefill(ids, check=False, last_only=True)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.prefill(ids, check=False, last_only=True)
        torch.cuda.synchronize()
    per = cuda_kernel_times(prof)
    total = sum(us for _, us in per.values())
    print(f"{args.format}: prefill {args.batch} x {args.prompt_len} wall {wall_us:.0f} us, kernel time {total:.0f} us "
          f"({args.batch * args.prompt_len / wall_us * 1e6:,.0f} tok/s)")
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    for name, (calls, us) in rows[:args.top]:
        print(f"{us:10.0f} us {100 * us / total:5.1f}% {calls:5d} x  {name[:110]}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(format=args.format, wall_us=wall_us, total_us=total,
                                                  kernels=[dict(name=n, calls=c, us=u) for n, (c, u) in rows])))


if __name__ == "__main__":
    main()
