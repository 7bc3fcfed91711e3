"""Compile the general int4 matmul kernels on plane words for sm_90 without a GPU (Triton's own ptxas) and print
registers, stack (spills), shared memory and the SASS mix that matters to them, as the CUDA defaults launch them at
BlackMamba-2.8B's expert shapes (8 experts, top-1):

* ``prefill``: the grouped expert GEMM (``_dequant_gemm_kernel``) at M = 2048 tokens, the config of
  :func:`qmamba.kernels.matmul_configs.gemm_config`;
* ``batch8``: the small-M kernel (``_dequant_matmul_kernel``) at 8 rows routed by expert (batched decode).

    python benchmarks/inspect_gemm_kernel.py [--cases prefill,batch8] [--shapes fc1,fc2] [--no-stack] [--weight-left]
        [--pairs] [--loop] [--gated]

Each case is compiled with the codes unpacked as integers and as floats (``MatmulPolicy.plane_float_codes``). A
guide to the instructions a choice costs, not a timing (the device's Triton may schedule differently); the timings
are ``bench_planes_gemm.py`` and ``bench_decode.py`` on a GPU. ``--no-stack`` exits 1 where the float codes spill. ``--pairs``: also each case with the codes unpacked two at a time (``MatmulPolicy.plane_code_pairs`` "exact"
and "scaled", as ``W x^T`` in the prefill). ``--loop``: each line also gives the instructions of the kernel's
longest loop (the K loop: one K tile of 128, per thread) and their mix.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_decode_kernel import _Recorder, compile_recorded, report  # noqa: E402

from qmamba.kernels import dequant_gemm as dg  # noqa: E402
from qmamba.kernels import w4a8_gemm as wg  # noqa: E402
from qmamba.kernels import w4a8_rows as wr  # noqa: E402
from qmamba.kernels import quant_matmul as qm  # noqa: E402
from qmamba.kernels import matmul_configs  # noqa: E402
from qmamba.kernels.matmul_configs import MatmulConfig, MatmulPolicy, gemm_config, pick_config  # noqa: E402
from qmamba.kernels.routing import ROUTE_BY_EXPERT, expert_tile_map  # noqa: E402
from qmamba.kernels.weights import PackedWeight  # noqa: E402
from qmamba.quant.formats import Int4Format  # noqa: E402

SHAPES = {"fc1": (1472, 7744), "fc2": (3872, 1472)}  # (K, N) of one expert of BlackMamba-2.8B
EXPERTS = 8
WATCH = ("HGMMA", "HMMA", "IGMMA", "IMMA", "I2FP", "I2F", "F2FP", "FADD", "FFMA", "HFMA2", "HADD2", "HMUL2", "PRMT",
         "LOP3", "BAR", "STS", "LDS", "LDGSTS")


class _CudaLike:
    """Stands in for ``torch.device("cuda")`` where the configs ask for the device type and SM count (the H200's
    132 multiprocessors)."""

    type, index = "cuda", "inspect"


matmul_configs._SM_COUNT[_CudaLike.index] = 132


def planes_stack(k: int, n: int) -> PackedWeight:
    fmt = Int4Format(128)
    w = torch.randn(EXPERTS, n, k) / k ** 0.5
    return fmt.kernel_weight(fmt.quantize_rtn(w), n, k).to_planes()


def compile_case(case: str, weight: PackedWeight, float_codes: bool, arch: int, weight_left: bool = False,
                 pairs: str = "", gate: str | None = None):
    """``(compiled kernel, config)`` of one case, recorded from the real launcher on CPU tensors (``pairs``:
    ``MatmulPolicy.plane_code_pairs``, with the inline PTX the CUDA launch takes; ``gate``: the prefill GEMM with
    the gated epilogue, ``MatmulPolicy.gemm_gated_act``)."""
    k = weight.k
    policy = MatmulPolicy(plane_float_codes=float_codes, plane_weight_left=weight_left, plane_code_pairs=pairs,
                          plane_gemm_code_pairs=pairs)
    if case == "prefill":
        m = 2048
        cfg = gemm_config(m, weight, _CudaLike())
        recorder, module, name = _Recorder(dg._dequant_gemm_kernel), dg, "_dequant_gemm_kernel"
    else:
        m = 8
        cfg = pick_config(m, weight, _CudaLike(), ROUTE_BY_EXPERT, policy)
        recorder, module, name = _Recorder(qm._dequant_matmul_kernel), qm, "_dequant_matmul_kernel"
    real = getattr(module, name)
    setattr(module, name, recorder)
    try:
        x = torch.randn(m, k).to(torch.bfloat16)
        idx = torch.randint(0, EXPERTS, (m,), dtype=torch.int32)
        tiles = expert_tile_map(idx, EXPERTS, cfg.block_m) if case == "prefill" else None
        qm.dequant_matmul(x, weight, row_expert=idx, tiles=tiles, config=cfg, policy=policy, gate=gate)
    finally:
        setattr(module, name, real)
    _, args, meta = recorder.calls[-1]
    if pairs:
        meta = dict(meta, ASM=True)  # recorded on CPU tensors: the launch on CUDA takes the PTX
    return compile_recorded(real, args, meta, arch), cfg


# (block_m, block_n, warps, stages, magic conversion, W x^T)
W4A8_TILES = ((64, 128, 4, 3, False, False), (64, 128, 4, 3, True, False), (128, 128, 8, 3, False, False),
              (64, 128, 4, 3, False, True), (128, 128, 8, 3, False, True), (64, 256, 8, 3, False, True))


def compile_w4a8(weight: PackedWeight, arch: int, block_m: int, block_n: int, warps: int, stages: int,
                 magic: bool, weight_left: bool = False, gate: str | None = None):
    """``(compiled kernel, config)`` of the W4A8 GEMM (:mod:`qmamba.kernels.w4a8_gemm`) on the experts' tiles of
    2,048 rows, with the inline PTX and the three-pass tf32 product a CUDA launch takes (``gate``: fc1's gated
    epilogue)."""
    m = 2048
    recorder, real = _Recorder(wg._w4a8_gemm_kernel), wg._w4a8_gemm_kernel
    wg._w4a8_gemm_kernel = recorder
    try:
        idx = torch.randint(0, EXPERTS, (m,), dtype=torch.int32)
        codes, scale, sums = wg.quantize_rows_int8_ref(torch.randn(m, weight.k), weight.qweight.shape[-1] * 8)
        wg.w4a8_gemm(codes, scale, sums, weight, tiles=expert_tile_map(idx, EXPERTS, block_m), block_m=block_m,
                     block_n=block_n, num_warps=warps, num_stages=stages, magic=magic, gate=gate,
                     weight_left=weight_left)
    finally:
        wg._w4a8_gemm_kernel = real
    _, args, meta = recorder.calls[-1]
    cfg = MatmulConfig(block_m, block_n, 128, 1, warps, stages)
    return compile_recorded(real, args, dict(meta, ASM=True, PRECISION="tf32x3"), arch), cfg


def compile_w4a8_rows(weight: PackedWeight, arch: int, rows: int = 8, block_n: int = 16, gate: str | None = None,
                      step: bool = False, row_scale: bool = False, chunk: int = 1, norm: bool = False):
    """The compiled W4A8 row-program kernel (:mod:`qmamba.kernels.w4a8_rows`: dp4a, a program a row) for ``rows``
    routed rows of ``weight``'s experts, with the inline PTX and the programmatic dependent launch a CUDA launch
    takes; ``step``: as the fused step runs a gated fc1 (``DecodePolicy.int8_rows``: the expert read after the wait,
    the output's input planes for fc2 written); ``row_scale``: each row times its routing weight (fc2's epilogue,
    ``DecodePolicy.int8_rows_fc2``); ``chunk``: 128-column tiles a step of its K loop; ``norm``: the last program of
    a row ending it with the add + norm after it (``out_norm``, ``DecodePolicy.int8_rows_fc2_norm``)."""
    from qmamba.kernels.row_norm import RowAddNorm
    from qmamba.quant.layout import INT4_X_PLANES, int4_x_planes_width

    recorder, real = _Recorder(wr._w4a8_rows_kernel), wr._w4a8_rows_kernel
    wr._w4a8_rows_kernel = recorder
    try:
        codes, scale, sums = wg.quantize_rows_int8_ref(torch.randn(rows, weight.k), weight.qweight.shape[-1] * 8)
        n_out = weight.n // 2 if gate else weight.n
        planes = torch.zeros(rows, INT4_X_PLANES, int4_x_planes_width(n_out)) if step else None
        wr.w4a8_rows(codes, scale, sums, weight, row_expert=torch.randint(0, EXPERTS, (rows,), dtype=torch.int32),
                     gate=gate, block_n=block_n, pdl=True, expert_ready=not step, out_planes=planes,
                     row_scale=torch.rand(rows) if row_scale else None, chunk=chunk,
                     out_norm=RowAddNorm(torch.zeros(rows, n_out), torch.ones(n_out), None,
                                         torch.zeros(rows, n_out, dtype=torch.bfloat16), 1e-5,
                                         torch.zeros(rows, dtype=torch.int32)) if norm else None)
    finally:
        wr._w4a8_rows_kernel = real
    _, args, meta = recorder.calls[-1]
    meta = {k: v for k, v in meta.items() if k != "launch_pdl"}
    return compile_recorded(real, args, dict(meta, ASM=True), arch)


def compile_quantize_rows_int8(arch: int, rows: int = 8, k: int = 3872):
    """The compiled int8 row quantizer (:func:`qmamba.kernels.w4a8_gemm.quantize_rows_int8`: the batched step's fc2
    input, fc1's output of ``k`` columns) for ``rows`` rows, with the meta-parameters a CUDA launch takes."""
    recorder, real = _Recorder(wg._quantize_rows_int8_kernel), wg._quantize_rows_int8_kernel
    wg._quantize_rows_int8_kernel = recorder
    try:
        wg.quantize_rows_int8(torch.randn(rows, k), -(-k // 128) * 128, pdl=True)
    finally:
        wg._quantize_rows_int8_kernel = real
    _, args, meta = recorder.calls[-1]
    meta = {key: v for key, v in meta.items() if key != "launch_pdl"}
    return compile_recorded(real, args, dict(meta, CUDA=True), arch)


def compile_route_int8(arch: int, tokens: int = 2048, d: int = 1472, quant: bool = True):
    """The compiled MoE routing kernel (:func:`qmamba.kernels.fused_moe.route_top1_int8`: the router's top-1 and,
    ``quant``, the row quantized to int8 for the W4A8 GEMM) for ``tokens`` rows of BlackMamba-2.8B's ``d`` in bf16
    and its 8 experts, with the meta-parameters a CUDA launch takes."""
    from qmamba.kernels import fused_moe as fm

    recorder, real = _Recorder(fm._route_top1_kernel), fm._route_top1_kernel
    fm._route_top1_kernel = recorder
    k_pad = -(-d // 128) * 128 if quant else None
    try:
        x = torch.randn(tokens, d).to(torch.bfloat16)
        router_w = torch.randn(EXPERTS, d).to(torch.bfloat16)
        if quant:
            fm.route_top1_int8(x, router_w, None, k_pad)
        else:
            fm.route_top1(x, router_w)
    finally:
        fm._route_top1_kernel = real
    _, args, meta = recorder.calls[-1]
    return compile_recorded(real, args, dict(meta, **fm.route_meta(d, EXPERTS, False, k_pad, cuda=True)), arch)


def route_logits_ops(compiled) -> list[str]:
    """The floating-point and shuffle opcodes of a compiled routing kernel's PTX (:func:`compile_route_int8`) before
    its first global store: the logits, sigmoid and argmax. The same sequence with and without the quantization is
    what keeps ``route_top1_int8``'s routing bit for bit ``route_top1``'s (a tile layout shared with the
    quantization's accesses changed the sums' shuffles in session 44)."""
    ptx = compiled.asm["ptx"]
    head = ptx[:ptx.index("st.global")]
    ops = r"(?:fma|mul|add|sub|max|min|neg|ex2|rcp|div|setp)\.[a-z0-9.]*f32|shfl\.[a-z.0-9]+"
    return re.findall(rf"^\s+(?:@%p\d+ )?({ops})", head, re.M)


def loop_body(sass: str) -> list[str]:
    """The opcodes of the longest loop of a SASS listing (a backward branch's target up to the branch)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[A-Z0-9_.]*(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [o for (a, o, _) in ins if int(target.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="prefill,batch8")
    ap.add_argument("--shapes", default="fc1,fc2")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--no-stack", action="store_true", help="exit 1 if the float codes spill")
    ap.add_argument("--weight-left", action="store_true",
                    help="also the prefill GEMM as W x^T (MatmulPolicy.plane_weight_left), float codes")
    ap.add_argument("--pairs", action="store_true",
                    help="also the codes two at a time (MatmulPolicy.plane_code_pairs exact / scaled)")
    ap.add_argument("--loop", action="store_true", help="also the K loop's instructions a thread and their mix")
    ap.add_argument("--w4a8", action="store_true", help="also the W4A8 GEMM (int8 activations, int8 tensor cores; "
                    "MatmulPolicy.w4a8_min_m) on the prefill's expert tiles")
    ap.add_argument("--gated", action="store_true", help="also fc1's prefill GEMM with the gated GELU epilogue "
                    "(MatmulPolicy.gemm_gated_act), scaled pairs and float codes")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    spilled = []

    def show(shape, case, label, compiled, cfg):
        r = report(compiled)
        mix = ", ".join(f"{o}={r['ops'][o]}" for o in WATCH if r["ops"][o])
        loop = ""
        if args.loop:
            body = collections.Counter(loop_body(r["sass"]))
            loop = f"  | loop {sum(body.values())}: " + ", ".join(f"{o}={body[o]}" for o in WATCH if body[o])
        print(f"{shape:4s} {case:8s} {label}  tile {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}  "
              f"regs {r['regs']:3d} stack {r['stack']:4d} shared {compiled.metadata.shared:6d}  "
              f"SASS {sum(r['ops'].values()):5d}: {mix}{loop}", flush=True)
        return r

    for shape in args.shapes.split(","):
        weight = planes_stack(*SHAPES[shape])
        for case in args.cases.split(","):
            for float_codes in (False, True):
                r = show(shape, case, f"{'float' if float_codes else 'int':5s} codes",
                         *compile_case(case, weight, float_codes, args.arch))
                if float_codes and r["stack"]:
                    spilled.append(f"{shape} {case}")
            if args.weight_left and case == "prefill":
                show(shape, case, "float codes, W x^T", *compile_case(case, weight, True, args.arch, weight_left=True))
            for pairs in ("exact", "scaled") if args.pairs else ():
                show(shape, case, f"pairs {pairs:6s}", *compile_case(case, weight, True, args.arch,
                                                                     weight_left=case == "prefill", pairs=pairs))
            if args.gated and case == "prefill" and shape == "fc1":
                for pairs in ("scaled", ""):
                    show(shape, case, f"gated, {pairs or 'float codes'}", *compile_case(
                        case, weight, True, args.arch, weight_left=True, pairs=pairs, gate="gelu"))
        w4a8_cases = [(t, None) for t in W4A8_TILES] if args.w4a8 else []
        if args.w4a8 and args.gated and shape == "fc1":
            w4a8_cases += [(W4A8_TILES[3], "gelu"), (W4A8_TILES[4], "gelu")]  # W x^T: the default tile, 128 x 128
        for (bm, bn, warps, stages, magic, left), gate in w4a8_cases:
            r = show(shape, "prefill", f"W4A8{' magic' if magic else ''}{' Wx^T' if left else ''}"
                     f"{' gated' if gate else ''}",
                     *compile_w4a8(weight, args.arch, bm, bn, warps, stages, magic, left, gate))
            if args.loop:  # where the loop waits for its tensor-core products
                waits = [line.split(";")[0].split("*/")[-1].strip() for line in r["sass"].splitlines()
                         if "WARPGROUP.DEPBAR" in line]
                print(f"     waits: {', '.join(waits)}")
    if args.no_stack and spilled:
        sys.exit(f"spills: {', '.join(spilled)}")


if __name__ == "__main__":
    main()
