"""Compile the chunked selective scan for sm_90 without a GPU (Triton's own ptxas) as the CUDA launcher would run it
at BlackMamba-2.8B's shapes (d_inner 2944, d_state 16, bf16 inputs laid out as the mixer makes them) and print, for
each kernel (``main``: the pass that writes y; ``summary``: the segments' end states), its registers, stack, and
the SASS instructions of its time loop a step, with the shuffles and MUFU (exp2 / log2 / reciprocal) among them:

    python benchmarks/inspect_scan_kernel.py [--steps 1,2,4,8] [--batches 1,8] [--arch 90] [--no-shuffles]

Each step updates 16 states of a channel: one exp2 (MUFU) and four FP32 operations a state are the floor of a step's
instructions (80); the rest is its loads, dt's softplus, y's skip and gate. ``--no-shuffles`` exits 1 where a loop
holds a shuffle: the states of a channel spread over lanes (session 46: Triton 3.6 laid the 2-D state tile out that
way whenever its 2-D loads left the choice to the coalescing pass, 24-64 shuffles a step). A guide to a choice's
instructions, not a timing: the timings are ``bench_scan.py`` on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_decode_kernel import _Recorder, compile_recorded, report  # noqa: E402
from inspect_gemm_kernel import loop_body  # noqa: E402

from qmamba.kernels import selective_scan as ss  # noqa: E402

D_INNER, D_STATE, DT_RANK = 2944, 16, 92


def compile_scan(batch: int, length: int, unroll: int, softplus_log2: bool, arch: int = 90, num_warps: int = 1,
                 n_segments: int = 16) -> dict:
    """``{"main": compiled, "summary": compiled}``: the chunked scan's two launches as the CUDA launcher makes them
    (its arguments recorded from a call on CPU tensors of the model's layout, the CUDA-only settings put back)."""
    uz = torch.zeros(batch, length, 2 * D_INNER, dtype=torch.bfloat16)
    dbc = torch.zeros(batch, length, DT_RANK + 2 * D_STATE, dtype=torch.bfloat16)
    args = dict(u=uz[..., :D_INNER], delta=torch.zeros(batch, length, D_INNER, dtype=torch.bfloat16),
                A=torch.zeros(D_INNER, D_STATE), B_ssm=dbc[..., DT_RANK:DT_RANK + D_STATE],
                C_ssm=dbc[..., DT_RANK + D_STATE:], D_skip=torch.zeros(D_INNER), z=uz[..., D_INNER:],
                delta_bias=torch.zeros(D_INNER), initial_state=torch.zeros(batch, D_INNER, D_STATE))
    kernel = ss._chunked_scan_kernel
    recorder = _Recorder(kernel)
    ss._chunked_scan_kernel = recorder
    try:
        ss.selective_scan_chunked(**args, n_segments=n_segments, num_warps=num_warps, unroll=unroll,
                                  softplus_log2=softplus_log2, bc_fp32=True, fast_exp=False)
    finally:
        ss._chunked_scan_kernel = kernel
    out = {}
    for _grid, call_args, meta in recorder.calls:
        # what the launcher sets from u.is_cuda: 32 channels a warp, the one-instruction logarithm of the softplus
        meta = dict(meta, BLOCK_D=32 * num_warps, SP_LOG2_ASM=softplus_log2)
        out["summary" if meta["SUMMARY"] else "main"] = compile_recorded(kernel, call_args, meta, arch)
    return out


def loop_report(compiled, unroll: int) -> dict:
    r = report(compiled)
    body = collections.Counter(loop_body(r["sass"]))
    return dict(regs=r["regs"], stack=r["stack"], per_step=sum(body.values()) / unroll,
                shuffles=body["SHFL"] / unroll, mufu=body["MUFU"] / unroll, loads=body["LDG"] / unroll)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1,2,4,8", help="steps a loop trip (the launcher's unroll)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--no-shuffles", action="store_true", help="exit 1 where a time loop holds a shuffle")
    args = ap.parse_args()
    import triton

    print(f"triton {triton.__version__}, sm_{args.arch}; per step: SASS instructions of the time loop / steps a trip")
    bad = []
    for batch in (int(b) for b in args.batches.split(",")):
        for unroll in (int(s) for s in args.steps.split(",")):
            for sp in (False, True):
                for name, compiled in compile_scan(batch, args.length, unroll, sp, args.arch).items():
                    r = loop_report(compiled, unroll)
                    print(f"B={batch} steps={unroll} softplus_log2={sp!s:5s} {name:7s}  regs {r['regs']:3d}  "
                          f"stack {r['stack']:3d}  per step {r['per_step']:6.1f}  SHFL {r['shuffles']:5.1f}  "
                          f"MUFU {r['mufu']:4.1f}  LDG {r['loads']:4.1f}", flush=True)
                    if r["shuffles"]:
                        bad.append(f"B={batch} steps={unroll} {name}")
    if args.no_shuffles and bad:
        print("shuffles in the time loop: " + ", ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
