"""Where the persistent decode step's time goes (run on the GPU): each recorded launch's phase inside the one
persistent launch, from program 0's reads of the GPU timer as each barrier opens (qmamba.kernels.persistent
``PersistentChain.timeline``).

    python benchmarks/profile_persistent_step.py --format int4_g128 [--variant persist_r128] [--runs 5] [--out p.json]

The step (batch 1, a bench_decode.py ``persist...`` variant of the CUDA policy, random-weight BlackMamba-2.8B) is
first checked: its logits against the fused PDL step's on the same state (the same kernel bodies: they must agree
to rounding, and pick the same greedy token), then profiled. Prints, per launch kind (its kernel and grid), the
launches per step, microseconds per step and per launch (medians over ``--runs``), and the phases' sum beside the
step's wall time (events around ``--runs`` plain launches). Exits non-zero when the check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

from qmamba.config import preset
from qmamba.fused_step import FusedDecodeStep
from qmamba.kernels.decode_linear import DecodePolicy
from qmamba.persistent_step import PersistentDecodeStep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import policy_variant  # noqa: E402
from bench_e2e import FORMATS, build  # noqa: E402
from timing import require_idle_gpu  # noqa: E402


def _label(launch) -> str:
    args = launch.args
    if launch.kernel == "decode_linear":
        extra = "".join(f" {k.lower()}" for k in ("ROUTED", "GATED", "CONV_EPI", "X_PLANES") if args.get(k))
        return f"decode_linear N={args['N']} K={args['K']}{extra}"
    if launch.kernel == "add_norm":
        return f"add_norm{' router' if args.get('ROUTER') else ''}{' first' if args.get('FIRST') else ''}"
    return launch.kernel


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--format", default="int4_g128", choices=sorted(FORMATS))
    ap.add_argument("--variant", default="persist", help="a persist... variant of bench_decode.py's --variants")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    require_idle_gpu()
    model = build(preset(args.preset), args.format)
    base = DecodePolicy.for_device(torch.device("cuda"))
    policy = policy_variant(base, args.variant)
    if not policy.persistent:
        sys.exit(f"error: variant {args.variant!r} is not a persistent one (persist...)")
    step = PersistentDecodeStep(model, policy)
    fused = FusedDecodeStep(model, base)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), device="cuda")
    _, state = model.prefill(prompt)
    other = state.clone()
    got = step(prompt[:, -1], state).float().clone()
    want = fused(prompt[:, -1], other).float()
    err = ((got - want).norm() / want.norm()).item()
    same_token = bool(torch.equal(got.argmax(-1), want.argmax(-1)))
    print(f"{args.format} {args.variant}: logits vs the fused step rel err {err:.2e}, greedy token "
          f"{'equal' if same_token else 'DIFFERS'}", flush=True)
    if step.fallback_batches or not step._recorded:
        sys.exit("FAILED: the step did not run persistent at batch 1")
    chain = next(iter(step._recorded.values())).chain
    runs = [chain.timeline() for _ in range(args.runs)]
    phase = [statistics.median(r[i] for r in runs) for i in range(len(chain.launches))]
    walls = []
    for _ in range(args.runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        chain()
        b.record()
        b.synchronize()
        walls.append(a.elapsed_time(b) * 1e3)
    per_kind = collections.OrderedDict()
    for launch, us in zip(chain.launches, phase):
        key = (_label(launch), launch.grid)
        n, total = per_kind.get(key, (0, 0.0))
        per_kind[key] = (n + 1, total + us)
    print(f"{chain.programs} programs, {len(chain.launches)} launches, {len(chain.kinds)} kinds; phases sum "
          f"{sum(phase):.1f} us, wall {statistics.median(walls):.1f} us (median of {args.runs})", flush=True)
    print(f"{'launch kind':48s} {'grid':>12s} {'n':>4s} {'us/step':>9s} {'us each':>8s}")
    for (label, grid), (n, total) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"{label:48s} {str(grid):>12s} {n:4d} {total:9.1f} {total / n:8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(0), format=args.format, variant=args.variant, programs=chain.programs,
            rel_err_vs_fused=err, same_token=same_token, wall_us=statistics.median(walls), phases_us=phase,
            kinds=[dict(kind=label, grid=list(grid), launches=n, us=total)
                   for (label, grid), (n, total) in per_kind.items()]), indent=1))
    if not (same_token and err < 1e-2):
        sys.exit(f"FAILED: the persistent step's logits differ from the fused step's (rel err {err:.2e})")


if __name__ == "__main__":
    main()
