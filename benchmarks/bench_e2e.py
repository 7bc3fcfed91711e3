"""End-to-end BlackMamba-2.8B (preset, random weights built on the GPU): ``qmamba bench``'s measurement
(:func:`qmamba.bench.bench_model`: decode checked against the reference path, then prefill tokens/s, decode
ms/token, peak memory) for bf16 / int8 / int4 g128 / 1-bit (binary projections and experts, int4 g128 x_proj,
dt_proj and head), side by side in one run.

    python benchmarks/bench_e2e.py --out e2e.json [--formats bf16,int4_g128] [--batches 1,8] [--prompt-len 2048]
        [--prefill-experts tiles|per_expert|whole_stack]

The same figures for a checkpoint on disk: ``qmamba bench PATH --batch 1,8``. A failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

from qmamba.bench import BenchCheckError, bench_model, format_table, weight_bytes  # noqa: F401 (re-exported)
from qmamba.config import preset
from qmamba.kernels.matmul_configs import DEFAULT_POLICY, using_policy
from qmamba.quant.binary import BinaryFormat
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.testing import quantize_rtn, random_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import require_idle_gpu  # noqa: E402

PREFILL_EXPERT_ROUTES = {"tiles": DEFAULT_POLICY,
                         "tiles_int_codes": dataclasses.replace(DEFAULT_POLICY, plane_float_codes=False),
                         "tiles_wright": dataclasses.replace(DEFAULT_POLICY, plane_weight_left=False),
                         "per_expert": dataclasses.replace(DEFAULT_POLICY, dequant_experts_min_m=64),
                         "whole_stack": dataclasses.replace(DEFAULT_POLICY, dequant_experts_min_m=64,
                                                            dequant_experts_whole_stack=True),
                         # the int4 plane-word GEMM's tile (MatmulPolicy.plane_gemm_tile: block_m x block_n, warps,
                         # stages): 8 warps at ~128 registers, two programs (four warpgroups) a multiprocessor
                         **{f"tiles_{bm}x{bn}w{w}s{s}": dataclasses.replace(DEFAULT_POLICY,
                                                                            plane_gemm_tile=(bm, bn, w, s))
                            for bm, bn, w, s in ((64, 128, 8, 4), (64, 128, 8, 3), (32, 128, 8, 4))},
                         # int4 plane codes two at a time in the GEMM kernel (MatmulPolicy.plane_gemm_code_pairs,
                         # "scaled" the default since session 35, "exact" session 34's), or float codes (nopairs);
                         # scaled also
                         # at larger tiles (one accumulator; sm_90, Triton 3.6, fc1: 166 registers at 64 x 128 w4,
                         # 233 at 128 x 128 w4 and 128 at 128 x 128 w8, none spilled; float codes spill at 128 x 128
                         # w4; 256 x 64 w4 194 and 256 x 128 w8 191, exact spills there)
                         "tiles_pairs": dataclasses.replace(DEFAULT_POLICY, plane_gemm_code_pairs="exact"),
                         # float codes, as before session 34
                         "tiles_nopairs": dataclasses.replace(DEFAULT_POLICY, plane_gemm_code_pairs=""),
                         **{f"tiles_pairss{'' if t is None else '_%dx%dw%ds%d' % t}": dataclasses.replace(
                             DEFAULT_POLICY, plane_gemm_code_pairs="scaled",
                             plane_gemm_tile=t or DEFAULT_POLICY.plane_gemm_tile)
                            for t in (None, (128, 128, 4, 2), (128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3),
                                      (256, 64, 4, 2), (256, 64, 4, 3), (256, 128, 8, 2))},
                         # the gated activation in an elementwise kernel after fc1 (MatmulPolicy.gemm_gated_act
                         # off; on, in fc1's epilogue, the default since session 36)
                         "tiles_ungated": dataclasses.replace(DEFAULT_POLICY, gemm_gated_act=False),
                         # the routed int4 expert stacks from 64 rows on int8 activations and int8 tensor cores
                         # (MatmulPolicy.w4a8_min_m, session 40: a change of numerics, off by default), and with the
                         # dense int4 matrices too (w4a8_all)
                         "w4a8": dataclasses.replace(DEFAULT_POLICY, w4a8_min_m=64),
                         # ... with fc1's input quantized by the routing kernel, not by a launch of its own
                         # (MatmulPolicy.w4a8_route_quantizes; session 43: level, off)
                         "w4a8_rq": dataclasses.replace(DEFAULT_POLICY, w4a8_min_m=64, w4a8_route_quantizes=True),
                         "w4a8_all": dataclasses.replace(DEFAULT_POLICY, w4a8_min_m=64, w4a8_dense=True),
                         # ... with fc1's gated activation by the elementwise kernel (session 40's route)
                         "w4a8_ungated": dataclasses.replace(DEFAULT_POLICY, w4a8_min_m=64, gemm_gated_act=False),
                         # ... on other tiles (MatmulPolicy.w4a8_tile, the default since session 41 is 64 x 128 with
                         # 4 warps and the product taken as W x^T, session 41's "w4a8_l"): the product x W^T as in
                         # session 40 ("r"), W x^T on 128 x 128 and 64 x 256 tiles (8 warps)
                         **{f"w4a8_{name}": dataclasses.replace(DEFAULT_POLICY, w4a8_min_m=64, w4a8_tile=tile)
                            for name, tile in (("r", (64, 128, 4, 3, False)), ("l128", (128, 128, 8, 3, True)),
                                               ("l256", (64, 256, 8, 3, True)), ("l128s4", (128, 128, 8, 4, True)))},
                         "w4a8_all_l128": dataclasses.replace(DEFAULT_POLICY, w4a8_min_m=64, w4a8_dense=True,
                                                              w4a8_tile=(128, 128, 8, 3, True))}
# name -> (format of the projections and experts, format of x_proj / dt_proj / head or None for the same);
# "int4_cli": int4 g128 with x_proj, dt_proj and the head float, as `qmamba quantize` writes it by default
FORMATS = {"bf16": (None, None), "int8": (Int8Format(), None), "int4_g128": (Int4Format(128), None),
           "binary+int4_g128": (BinaryFormat(), Int4Format(128)), "int4_cli": (Int4Format(128), None)}


def build(cfg, name, dtype=torch.bfloat16):
    """The preset with random weights (seed 0: the same weights in every dtype), RTN-quantized to ``name``."""
    model = random_model(cfg, "cuda", dtype)
    fmt, sensitive = FORMATS[name]
    if fmt is not None:
        cli = name == "int4_cli"
        quantize_rtn(model, fmt, head=not cli, sensitive_fmt=sensitive, float_xdt=cli)
    model.set_backend("triton")
    gc.collect()
    torch.cuda.empty_cache()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prefill-experts", default="tiles", choices=sorted(PREFILL_EXPERT_ROUTES),
                    help="route of the routed int8/int4 expert matmuls from M = 64 (the prefill): the int4 tile "
                         "kernel (default), expert by expert dequantized + float tiles, or the whole stack "
                         "dequantized + one float grouped GEMM")
    args = ap.parse_args()
    require_idle_gpu()
    cfg = preset(args.preset)
    result = dict(preset=args.preset, device=torch.cuda.get_device_name(0), rows=[], failures=[])
    for name in args.formats.split(","):
        model = build(cfg, name)
        try:
            with using_policy(PREFILL_EXPERT_ROUTES[args.prefill_experts]):
                rows = bench_model(model, [int(b) for b in args.batches.split(",")], args.prompt_len, args.tokens,
                                   log=lambda s, n=name: print(f"{n}: {s}", flush=True),
                                   check_model=lambda n=name: build(cfg, n, torch.float32))
        except BenchCheckError as exc:
            result["failures"].append(f"{name}: {exc}")
            print(f"{name}: FAILED {exc}", flush=True)
            rows = []
        for r in rows:
            result["rows"].append(dict(format=name, **r.as_dict()))
        if rows:
            print(format_table(rows), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(result, indent=1))
    if result["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
