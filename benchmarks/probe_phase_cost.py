"""Upper bounds of what removing one kind of launch from the fused decode step could save (run on the GPU): the
CUDA-graph step of a random-weight preset with every launch of that kind skipped, timed against the full step in
interleaved rounds. The skipped step computes garbage, so these are timings of a step that does not exist, not
results: use them to decide which fusion is worth building (session 26: skipping the 36 add + norm launches
between layers took int4 g128 batch 1 from 0.521 to 0.443 ms/token, which justified ``DecodePolicy.norm_in_gemvs``).

    python benchmarks/probe_phase_cost.py --formats int4_g128 --variants default,no_norm_all,no_xproj,no_ssm
        [--batches 1,8] [--out phase.json]

Kinds: ``no_norm_all`` / ``no_norm_mamba`` / ``no_norm_moe`` (the add + norm launches but the first and the last),
``no_xproj``, ``no_ssm`` (the dt / state update), ``no_inproj``, ``no_outproj``, ``no_fc1``, ``no_fc2``. Routing
buffers are preset to valid experts so that skipped routers leave the expert kernels in bounds. The variants run
under the device's default policy with ``norm_in_gemvs`` off (the add + norm launches exist to be skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

import qmamba.fused_step as fs
from qmamba.config import preset
from qmamba.cuda_graph import GraphDecoder
from qmamba.kernels.decode_policy import DecodePolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import time_graph  # noqa: E402
from bench_e2e import FORMATS, build  # noqa: E402

KINDS = {"no_xproj": "x_proj", "no_outproj": "out_proj", "no_inproj": "in_proj", "no_fc1": "fc1", "no_fc2": "fc2"}
VARIANTS = ("default", "no_norm_all", "no_norm_mamba", "no_norm_moe", "no_ssm") + tuple(KINDS)


class SkippingStep(fs.FusedDecodeStep):
    """The fused step with one kind of launch skipped (``skip``: a name of :data:`VARIANTS`)."""

    def __init__(self, model, policy, skip: str):
        super().__init__(model, policy)
        self.skip = skip

    def _workspace(self, batch, device):
        new = batch not in self._buffers
        buf = super()._workspace(batch, device)
        if new:  # valid experts for routers that never run
            buf["idx"].copy_(torch.arange(batch, device=device, dtype=torch.int32) % 8)
            buf["rwt"].fill_(0.5)
        return buf

    def _add_norm(self, buf, h, ids, norm_w, call, router=None, norm_b=None, **kw):
        if 0 < call < len(self.layers) and (self.skip == "no_norm_all" or
                                            (self.skip == "no_norm_mamba" and router is None) or
                                            (self.skip == "no_norm_moe" and router is not None)):
            return
        return super()._add_norm(buf, h, ids, norm_w, call, router=router, norm_b=norm_b, **kw)

    def _decode(self, x, weight, out, **kw):
        kind = KINDS.get(self.skip)
        if kind and any(getattr(p, kind, None) is weight for p in self.layers):
            return out
        return super()._decode(x, weight, out, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--formats", default="int4_g128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [f for f in args.formats.split(",") if f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown variants / formats: {unknown} (variants: {', '.join(VARIANTS)})")
    if not torch.cuda.is_available():
        raise SystemExit("probe_phase_cost.py times CUDA graphs: it needs a CUDA GPU")
    policy = dataclasses.replace(DecodePolicy.for_device(torch.device("cuda")), norm_in_gemvs=False)
    dt_update = fs.dt_state_update
    cfg = preset(args.preset)
    res = {}
    for fmt in args.formats.split(","):
        with torch.no_grad():
            model = build(cfg, fmt, torch.bfloat16)
            times = {}
            for rnd in range(-1, args.rounds):  # one untimed warm-up round of the first variant
                for v in variants[:1] if rnd < 0 else variants:
                    fs.dt_state_update = (lambda *a, **k: None) if v == "no_ssm" else dt_update
                    decoder = GraphDecoder(model, policy=policy)
                    decoder._step = SkippingStep(model, policy, v)
                    for b in (int(b) for b in args.batches.split(",")):
                        ms = time_graph(decoder, b)
                        if rnd >= 0:
                            times.setdefault(f"{fmt} b{b} {v}", []).append(ms)
                    del decoder
                    gc.collect()
            fs.dt_state_update = dt_update
            for key, ts in times.items():
                res[key] = statistics.median(ts)
                print(f"{key:40s} {res[key]:.4f} ms/token (median of {len(ts)}, spread {max(ts) - min(ts):.4f})",
                      flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
