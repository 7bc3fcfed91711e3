"""The decode linear kernel at BlackMamba-2.8B's shapes, one row (batch 1): every int4 variant (stored word layout
or plane words, nibbles shifted or masked in place, rows per program) beside the bf16 decode kernel, int8 and 1-bit
weights on the decode kernel and on their general kernels (the step's path for them until measured otherwise),
cuBLAS bf16 and a no-arithmetic probe that only moves the int4 bytes, side by side in one run.

    python benchmarks/bench_decode_linear.py --out decode_linear.json [--preset blackmamba-2.8b]

Each figure is microseconds per call inside a CUDA graph of dependent calls over rotating weight copies (larger
than L2), with programmatic dependent launch as in the decode step. Every variant's output is first checked
against :func:`decode_linear_ref` (float32 over the dequantized weight; relative error under 1e-2 with bf16
inputs): a failed check exits non-zero after the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from qmamba.config import preset
from qmamba.kernels.binary_matmul import binary_matmul
from qmamba.kernels.decode_linear import decode_linear, decode_linear_ref
from qmamba.kernels.decode_policy import DecodePolicy, pdl_supported
from qmamba.kernels.quant_matmul import dequant_matmul
from qmamba.kernels.w4a8_gemm import int8_rounded_ref, quantize_rows_int8
from qmamba.kernels.w4a8_rows import w4a8_rows
from qmamba.kernels.weights import BinaryWeight, PackedWeight, int32_words
from qmamba.quant.formats import BinaryFormat, Int4Format, Int8Format
from qmamba.quant.layout import int4_x_planes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copies_for, time_calls, require_idle_gpu  # noqa: E402


@triton.jit
def _bytes_probe_kernel(w_ptr, x_ptr, out_ptr, N, NW, BLOCK_N: tl.constexpr, NWP: tl.constexpr,
                        PDL: tl.constexpr):
    """Loads a [BLOCK_N, NW] int32 tile before the wait (as the decode kernel does), then a trivial sum: the cost of
    moving the int4 bytes with this program shape, without the unpacking arithmetic."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, NWP)
    m = (rows < N)[:, None] & (cols < NW)[None, :]
    w = tl.load(w_ptr + rows[:, None] * NW + cols[None, :], mask=m, other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr).to(tl.float32)
    y = tl.sum((w & 0xFF).to(tl.float32), axis=1) * x
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)


def shapes(cfg):
    """name -> (N, K, experts, call options) of every matrix a decode token reads."""
    di = cfg.d_model * cfg.expand
    ffn = cfg.ffn_hidden
    experts = next(int(kind) for kind in cfg.layers if kind != "r")
    return {
        "in_proj": (2 * di, cfg.d_model, None, {}),
        "x_proj": (cfg.dt_rank + 2 * cfg.d_state, di, None, {}),
        "out_proj": (cfg.d_model, di, None, {}),
        "fc1_gated": (2 * ffn, cfg.d_model, experts, {"gated": cfg.expert_activation}),
        "fc2": (cfg.d_model, ffn, experts, {"row_scale": True}),
        "head": (cfg.vocab_size, cfg.d_model, None, {}),
    }


def variants(pdl: bool, rows: int):
    """name -> (weight form, policy or "general"): at one row every decode-kernel variant; at several rows the
    plane words' tensor-core path beside the general kernel (dequant_matmul) on the stored layout."""
    cuda = DecodePolicy.cuda(132, pdl)  # the H200's CUDA policy (132 SMs)
    if rows > 1:
        # routed expert stacks (fc1, fc2): one program row per input row, each the one-row kernel on its own
        # expert's tile (DecodePolicy.routed_row_programs), as the CUDA policy reads int4 / bf16 at one row
        rowprog = dataclasses.replace(cuda, routed_row_programs=True)
        return {"planes_mma": ("planes", DecodePolicy(pdl=pdl)), "general": ("words", "general"),
                # the general small-M kernel on plane words (its codes two at a time since session 34; fc1 without
                # the activation, a launch of its own in the step)
                "general_planes": ("planes", "general"),
                "rowprog": ("planes", rowprog),
                # the tile row in two power-of-two pieces (DecodePolicy.int4_tile_pieces)
                "rowprog_pieces": ("planes", dataclasses.replace(rowprog, int4_tile_pieces=True)),
                "rowprog_bf16": ("float", rowprog), "general_bf16": ("float", "general"),
                # int8 activations with dp4a, a program a row (qmamba.kernels.w4a8_rows, session 41): the kernel
                # alone on codes quantized before (16 / 32 / 64 weight rows a program), then with the row quantizer
                # in each call
                **{f"w4a8_rows_bn{bn}": ("planes", ("w4a8_rows", bn, False, 1)) for bn in (16, 32, 64)},
                "w4a8_rows_q": ("planes", ("w4a8_rows", 32, True, 1)),
                # and 2-8 tiles a step of the K loop, the next step's operands loaded before this one's products
                # (session 48: a chain of tiles / chunk dependent loads a program)
                **{f"w4a8_rows_bn{bn}c{c}": ("planes", ("w4a8_rows", bn, False, c))
                   for bn in (16, 32) for c in (2, 4, 8)},
                **{f"w4a8_rows_q_bn{bn}c{c}": ("planes", ("w4a8_rows", bn, True, c))
                   for bn in (16, 32) for c in (4, 8)}}
    out = {"cuda_default": ("planes", cuda), "cuda_default_float": ("float", cuda),
           # int8 and 1-bit weights on the CUDA policy (which lists both), and on their general kernels
           "cuda_int8": ("int8", cuda),
           "cuda_binary": ("binary", cuda),  # 1-bit as the CUDA policy reads it ("denorm", since session 20)
           "general_int8": ("int8", "general"), "general_binary": ("binary", "general"),
           # 1-bit with fewer rows a program, or with sign flips per bit position (the reading before session 20)
           "cuda_binary_bn4": ("binary", dataclasses.replace(cuda, block_n_binary=4, block_n_binary_gated=4)),
           "cuda_binary_bn8": ("binary", dataclasses.replace(cuda, block_n_binary=8, block_n_binary_gated=8)),
           "cuda_binary_shift": ("binary", dataclasses.replace(cuda, int4_unpack="shift")),
           # the input of in_proj / fc1's int4 codes read in the tile's shape (DecodePolicy.int4_x_in_tile)
           "cuda_x_in_tile": ("planes", dataclasses.replace(cuda, int4_x_in_tile=True)),
           # the input as prepared int4 input planes (DecodePolicy.int4_x_planes: add + norm writes them)
           "cuda_x_planes": ("planes", dataclasses.replace(cuda, int4_x_planes=True)),
           "cuda_x_planes_bcast": ("planes", dataclasses.replace(cuda, int4_x_planes=True, int4_x_in_tile=False)),
           # the input x itself, converted and scaled per code (the CUDA policy before session 19)
           "cuda_x_direct": ("planes", dataclasses.replace(cuda, int4_x_planes=False)),
           # twice the int4 rows a program for a (not gated) grid just past 1056 programs (one wave at 8 a
           # multiprocessor: DecodePolicy.max_programs), and all int4 matrices at 4 or 16 rows a program (the CUDA
           # policy's: 8 since session 33)
           "cuda_maxp1056": ("planes", dataclasses.replace(cuda, max_programs=1056)),
           "cuda_bn4": ("planes", dataclasses.replace(cuda, block_n_int4=4)),
           "cuda_bn16": ("planes", dataclasses.replace(cuda, block_n_int4=16)),
           # out_proj / fc2 with their input broadcast, not read in the tile's shape (DecodePolicy.int4_x_in_tile_wide
           # "row_programs": the CUDA policy's until session 33)
           "cuda_x_in_tile_narrow": ("planes", dataclasses.replace(cuda, int4_x_in_tile_wide="row_programs")),
           # the tile row padded to a power of two, not in two pieces (DecodePolicy.int4_tile_pieces off), and with
           # it 4 int4 rows a program: the CUDA policy of session 32 (what session 33's table calls cuda_default)
           "cuda_nopieces": ("planes", dataclasses.replace(cuda, int4_tile_pieces=False, block_n_int4=4,
                                                          int4_x_in_tile_wide="row_programs")),
           # the products of a row reduced piece by piece (DecodePolicy.planes_joint off: the CUDA policy before
           # session 37; H100, kernels alone, the word sums in plane 8, joint against this: in_proj 3.54 against
           # 3.83 us, fc1 6.45 against 5.94)
           "cuda_nojoint": ("planes", dataclasses.replace(cuda, planes_joint=False)),
           # the CUDA policy with 2 or 8 warps a program (the same rows: twice or half the codes a thread)
           "cuda_w2": ("planes", dataclasses.replace(cuda, num_warps=2)),
           "cuda_w8": ("planes", dataclasses.replace(cuda, num_warps=8))}
    for bn in (4, 8, 16, 32):
        out[f"binary_bn{bn}"] = ("binary", DecodePolicy(pdl=pdl, block_n_binary=bn))
    for bn in (2, 4, 8):
        out[f"int8_bn{bn}"] = ("int8", DecodePolicy(pdl=pdl, block_n_float=bn))
    for bn in (2, 4, 8):
        out[f"bf16_bn{bn}"] = ("float", DecodePolicy(pdl=pdl, block_n_float=bn))
    for layout in ("words", "planes"):
        for unpack in ("shift", "magic", "denorm"):
            for bn in (4, 8, 16):
                name = f"{layout}{'' if unpack == 'shift' else '_' + unpack}_bn{bn}"
                out[name] = (layout, DecodePolicy(pdl=pdl, block_n_int4=bn, int4_unpack=unpack))
                # "_mp": at least 264 programs (2 per multiprocessor) where the matrix has the rows for them
                out[name + "_mp"] = (layout, DecodePolicy(pdl=pdl, block_n_int4=bn, int4_unpack=unpack,
                                                          min_programs=264))
    for bn, warps in ((8, 2), (16, 8), (32, 8)):
        out[f"planes_magic_bn{bn}_w{warps}"] = ("planes", DecodePolicy(pdl=pdl, block_n_int4=bn, int4_unpack="magic",
                                                                       num_warps=warps))
    out["general"] = ("words", "general")
    return out


def clones(weight: PackedWeight | BinaryWeight, per_call_bytes: int) -> list:
    """Enough copies of ``weight`` (every tensor cloned) that a rotation over them is not served from L2."""
    fields = ("qweight", "alpha", "beta") if isinstance(weight, BinaryWeight) else ("qweight", "scales", "zeros")
    return [dataclasses.replace(weight, **{f: getattr(weight, f).clone() for f in fields
                                           if getattr(weight, f) is not None})
            for _ in range(copies_for(per_call_bytes, cap=1024))]


def weight_forms(w, n: int, k: int, dev, needed=("words", "planes", "float", "int8", "binary")) -> dict:
    """The float weight ``w`` in the forms the variants read (``needed``; the int4 stored words always, the
    reference of the int4 forms): int4 g128 (stored words, plane words), its bf16 dequantization, int8 and 1-bit
    (Bi-Mamba form)."""
    def packed(fmt):
        return fmt.kernel_weight({key: t.to(dev) for key, t in fmt.quantize_rtn(w).items()}, n, k)

    int4 = packed(Int4Format(128))
    make = {"planes": int4.to_planes, "float": lambda: PackedWeight.from_float(int4.dequantized(torch.bfloat16)),
            "int8": lambda: packed(Int8Format()), "binary": lambda: packed(BinaryFormat())}
    return {"words": int4, **{name: make[name]() for name in needed if name in make}}


def bench_shape(name, n, k, experts, opts, rows, pdl, dev, result, only_variants=()):
    lead = (experts,) if experts else ()
    w = torch.randn(*lead, n, k) / k ** 0.5
    chosen = {v: f for v, f in variants(pdl, rows).items() if not only_variants or v in only_variants}
    forms = weight_forms(w, n, k, dev, {form for form, _ in chosen.values()} | {"float"})  # float: cuBLAS below
    int4 = forms["words"]
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    kw = {}
    if experts:
        kw["row_expert"] = torch.randint(0, experts, (rows,), dtype=torch.int32, device=dev) if rows > 1 else \
            torch.tensor([experts - 2], dtype=torch.int32, device=dev)
    if opts.get("row_scale"):
        kw["row_scale"] = torch.rand(rows, device=dev) + 0.5
    gated = opts.get("gated")
    n_out = n // 2 if gated else n
    row = dict(shape=name, rows=rows, n=n, k=k, experts=experts or 1)
    bytes_one = sum(t.numel() * t.element_size() for t in (int4.qweight, int4.scales, int4.zeros)) // (experts or 1)
    used = len(set(kw["row_expert"].tolist())) if experts else 1
    row["int4_bytes_per_call"] = bytes_one * used
    for vname, (form, policy) in chosen.items():
        weight = forms[form]
        exact = int4 if form in ("words", "planes", "float") else weight  # what the output is checked against
        if isinstance(policy, tuple):  # ("w4a8_rows", weight rows a program, quantizer in each call, tiles a
            #                              step): int8 activations, checked against the int8-rounded input's product
            _, bn, with_quantizer, chunk = policy
            ref = decode_linear_ref(int8_rounded_ref(x), exact, gated=gated, **kw)
            out = torch.full((rows, n_out), float("nan"), device=dev, dtype=torch.bfloat16)
            q = quantize_rows_int8(x, int4.k_padded)

            def call(wc, out=out, bn=bn, wq=with_quantizer, q=q, chunk=chunk):
                w4a8_rows(*(quantize_rows_int8(x, int4.k_padded) if wq else q), wc, out=out, gate=gated, block_n=bn,
                          pdl=pdl, chunk=chunk, **kw)
            call(weight)
        elif policy == "general":  # the general kernel computes fc1 without the activation
            ref = decode_linear_ref(x, exact, **kw)
            general = binary_matmul if form == "binary" else dequant_matmul
            call = lambda wc, general=general: general(x, wc, **kw)  # noqa: E731
            out = call(weight)
        else:
            ref = decode_linear_ref(x, exact, gated=gated, **kw)
            out = torch.full((rows, n_out), float("nan"), device=dev, dtype=torch.bfloat16)
            # int4 input planes as the fused step gives them: with the word sums where add + norm writes them
            # (in_proj, fc1, head), without them where the SSM update / fc1 does (out_proj, fc2)
            xpl = int4_x_planes(x) if policy.int4_x_planes else None
            sums = name not in ("out_proj", "fc2")
            call = lambda wc, out=out, policy=policy, xpl=xpl, sums=sums: decode_linear(  # noqa: E731
                x, wc, out, policy=policy, gated=gated, x_planes=xpl, x_plane_sums=sums, **kw)
            call(weight)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            result["failures"].append(f"{name} rows {rows} {vname}: rel err {err:.2e}")
        per_call = weight.qweight.numel() * weight.qweight.element_size() // (experts or 1) * used
        us = time_calls([lambda wc=wc: call(wc) for wc in clones(weight, per_call)], calls_per_graph=None)
        row[vname] = us
        row[vname + "_err"] = err
    if not experts:  # cuBLAS bf16 of the same matrix
        dense = forms["float"].qweight[0]
        mats = [dense.clone() for _ in range(copies_for(dense.numel() * 2, cap=1024))]
        row["cublas_bf16"] = time_calls([lambda m=m: torch.nn.functional.linear(x, m) for m in mats],
                                        calls_per_graph=None)
    if rows == 1:  # bytes probe: the int4 words of one matrix, no unpacking
        words = int32_words(int4.qweight)[0]
        nw = words.shape[-1]
        probe_out = torch.empty(n, device=dev, dtype=torch.bfloat16)
        launch = dict(launch_pdl=True) if pdl else {}

        def probe(wc):
            _bytes_probe_kernel[(triton.cdiv(n, 8),)](wc, x, probe_out, n, nw, BLOCK_N=8,
                                                      NWP=triton.next_power_of_2(nw), PDL=pdl, num_warps=4, **launch)
        row["probe_bytes_bn8"] = time_calls([lambda wc=wc: probe(wc) for wc in
                                             [words.clone() for _ in range(copies_for(words.numel() * 4, cap=1024))]],
                                            calls_per_graph=None)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    ap.add_argument("--rows", default="1,8", help="input rows (batch sizes) to time")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args()
    require_idle_gpu()
    cfg = preset(args.preset)
    dev = torch.device("cuda")
    pdl = pdl_supported(dev)
    torch.manual_seed(0)
    result = dict(device=torch.cuda.get_device_name(0), pdl=pdl, rows=[], failures=[])
    for rows in [int(r) for r in args.rows.split(",")]:
        table = []
        for name, (n, k, experts, opts) in shapes(cfg).items():
            if args.only and name not in args.only.split(","):
                continue
            row = bench_shape(name, n, k, experts, opts, rows, pdl, dev, result,
                              [v for v in args.variants.split(",") if v])
            print(f"rows {rows} {name:10s} " + " ".join(f"{v}={row[v]:.2f}" for v in row
                                                       if not v.endswith("_err") and isinstance(row[v], float)),
                  flush=True)
            table.append(row)
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=1))
        names = []
        for r in table:
            names += [v for v in r if isinstance(r[v], float) and not v.endswith("_err") and v not in names]
        print(f"\nus per call, {rows} row(s) (CUDA graph of dependent calls, PDL={pdl})")
        print(f"{'variant':24s}" + "".join(f"{r['shape']:>11s}" for r in table))
        for v in names:
            print(f"{v:24s}" + "".join(f"{r[v]:11.2f}" if v in r else f"{'-':>11s}" for r in table))
        print(flush=True)
    if result["failures"]:
        print("FAILED:\n  " + "\n  ".join(result["failures"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
