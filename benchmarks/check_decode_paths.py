"""Where a decode step's error comes from (GPU): relative logits error of one step against the eager reference
path, for the fused step with and without PDL, eager and graph-replayed, and the unfused Triton-backend step.

    python benchmarks/check_decode_paths.py [--formats int4_g128,bf16] [--dtypes bfloat16,float32] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

from qmamba.config import preset
from qmamba.cuda_graph import GraphDecoder
from qmamba.fused_step import FusedDecodeStep
from qmamba.kernels.decode_policy import DecodePolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--formats", default="int4_g128,bf16")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    cfg = preset(args.preset)
    pol = DecodePolicy.for_device(torch.device("cuda"))
    nopdl = dataclasses.replace(pol, pdl=False)
    for name in args.formats.split(","):
        for dt in args.dtypes.split(","):
            model = build(cfg, name, getattr(torch, dt))
            for batch in [int(b) for b in args.batches.split(",")]:
                prompt = torch.randint(0, cfg.vocab_size, (batch, 8), device="cuda")
                model.set_backend("reference")
                _, state = model.prefill(prompt)
                tok = prompt[:, -1]
                ref = model.step(tok, state.clone(), check=False)
                model.set_backend("triton")
                out = {"triton model.step": model.step(tok, state.clone(), check=False)}
                out["fused eager pdl"] = FusedDecodeStep(model, pol)(tok, state.clone())
                out["fused eager nopdl"] = FusedDecodeStep(model, nopdl)(tok, state.clone())
                out["fused graph pdl"] = GraphDecoder(model, policy=pol)(tok, state.clone())
                out["fused graph nopdl"] = GraphDecoder(model, policy=nopdl)(tok, state.clone())
                print(f"{name} {dt} batch {batch}: " + ", ".join(f"{k} {rel(v, ref):.2e}" for k, v in out.items()),
                      flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
