"""GPU kernel benchmarks (run on the H100): dequant GEMV/GEMM (int8, int4 g128, 1-bit binary) side by side with
cuBLAS bf16, torch's int4 kernel (tinygemm) and bitsandbytes NF4 / int8, config sweeps of our small-M paths, and the
selective scan against the PyTorch sequential reference and the memory floor.

    python benchmarks/bench_kernels.py --out results/kernels.json [--quick]

Method: benchmarks/timing.py (CUDA-graph replay of one call per node, rotating weight copies, median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copies_for, copy_bandwidth, time_calls, require_idle_gpu  # noqa: E402

from qmamba.kernels.binary_matmul import binary_matmul  # noqa: E402
from qmamba.kernels.dequantize import dequantize_stack  # noqa: E402
from qmamba.kernels.matmul_configs import (BinaryConfig, MatmulConfig, MatmulPolicy, pick_binary_config,  # noqa: E402
                                           pick_config)
from qmamba.kernels.quant_matmul import dequant_matmul  # noqa: E402
from qmamba.kernels.selective_scan import selective_scan_ref, selective_scan_triton  # noqa: E402
from qmamba.quant.binary import BinaryFormat  # noqa: E402
from qmamba.quant.formats import Int4Format, Int8Format  # noqa: E402

SHAPES = [("8192x8192", 8192, 8192), ("16384x16384", 16384, 16384), ("in_proj 1472->5888", 1472, 5888),
          ("out_proj 2944->1472", 2944, 1472), ("expert fc1 1472->7744", 1472, 7744),
          ("expert fc2 3872->1472", 3872, 1472), ("head 1472->50304", 1472, 50304)]
M_VALUES = [1, 4, 16, 64, 256, 2048]


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---- methods: each returns (bytes per copy, list of callables over x) --------------------------------------------------
def method_cublas(k, n, copies):
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k) for _ in range(copies)]
    return nbytes(ws[0]), [lambda x, w=w: F.linear(x, w) for w in ws]


def _packed(fmt, k, n, copies):
    base = torch.randn(n, k, device="cuda") / math.sqrt(k)
    out = []
    for i in range(copies):
        p = fmt.quantize_rtn(base if i == 0 else base.roll(i, 0))
        out.append(fmt.kernel_weight(p, n, k))
    return out


def method_ours(fmt, config_for=None):
    def build(k, n, copies):
        pws = _packed(fmt, k, n, copies)
        size = nbytes(pws[0].qweight, pws[0].scales, pws[0].zeros)
        return size, [lambda x, pw=pw: dequant_matmul(x, pw, config=config_for(x.shape[0], pw) if config_for
                                                      else None) for pw in pws]
    return build


def _binary(k, n, copies):
    base = torch.randn(n, k, device="cuda") / math.sqrt(k)
    fmt = BinaryFormat()
    return [fmt.kernel_weight(fmt.quantize_rtn(base if i == 0 else base.roll(i, 0)), n, k) for i in range(copies)]


def method_binary(k, n, copies):
    bws = _binary(k, n, copies)
    size = nbytes(bws[0].qweight, bws[0].alpha, bws[0].beta)
    return size, [lambda x, bw=bw: binary_matmul(x, bw) for bw in bws]


def method_torch_int4(k, n, copies):
    if k % 128 or n % 8:
        raise ValueError("K not a multiple of 128")
    fns, size = [], 0
    for _ in range(copies):
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        wpack = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        sz = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        size = nbytes(wpack, sz)
        fns.append(lambda x, w=wpack, s=sz: torch.ops.aten._weight_int4pack_mm(x, w, 128, s))
    return size, fns


def method_bnb_nf4(k, n, copies):
    import bitsandbytes as bnb

    fns, size = [], 0
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        qw, st = bnb.functional.quantize_4bit(w, quant_type="nf4", blocksize=64)
        size = nbytes(qw, st.absmax)
        fns.append(lambda x, qw=qw, st=st: bnb.matmul_4bit(x, qw.t(), quant_state=st))
    return size, fns


def method_bnb_int8(k, n, copies):
    import bitsandbytes as bnb

    fns, size = [], 0
    for _ in range(copies):
        lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
        lin.weight = bnb.nn.Int8Params(torch.randn(n, k, dtype=torch.float16) / math.sqrt(k), requires_grad=False,
                                       has_fp16_weights=False)
        lin = lin.cuda()
        size = n * k + 4 * n
        fns.append(lambda x, lin=lin: lin(x))
    return size, fns


METHODS = {"cublas_bf16": method_cublas, "ours_int8": method_ours(Int8Format()),
           "ours_int4_g128": method_ours(Int4Format(128)), "ours_binary": method_binary,
           "torch_int4_g128": method_torch_int4,
           "bnb_nf4": method_bnb_nf4, "bnb_int8": method_bnb_int8}


def bench_matmuls(bw, m_values, shapes, log, methods=None):
    rows = []
    for label, k, n in shapes:
        for name, build in METHODS.items():
            if methods and name not in methods:
                continue
            try:
                size, _ = None, None
                probe_bytes = {"cublas_bf16": 2 * n * k, "ours_int8": n * k, "bnb_int8": n * k,
                               "ours_binary": n * k // 8}.get(name, n * k // 2)
                copies = copies_for(probe_bytes)
                size, fns = build(k, n, copies)
            except Exception as exc:  # noqa: BLE001 - a peer that does not run is reported, not fatal
                for m in m_values:
                    rows.append(dict(shape=label, k=k, n=n, m=m, method=name, error=f"{type(exc).__name__}: {exc}"[:200]))
                log(f"{label} {name}: unavailable ({type(exc).__name__}: {str(exc)[:100]})")
                continue
            for m in m_values:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                try:
                    us = time_calls([lambda f=f: f(x) for f in fns])
                    moved = size + 2 * m * (k + n)
                    rows.append(dict(shape=label, k=k, n=n, m=m, method=name, us=us, bytes=moved,
                                     gbps=moved / us / 1e3, frac_copy_bw=moved / (us * 1e-6) / bw,
                                     tflops=2 * m * n * k / us / 1e6))
                    log(f"{label:24s} M={m:5d} {name:16s} {us:9.1f} us  {moved / us / 1e3:7.0f} GB/s")
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(shape=label, k=k, n=n, m=m, method=name, error=f"{type(exc).__name__}: {exc}"[:200]))
                    log(f"{label} M={m} {name}: failed {type(exc).__name__}: {str(exc)[:120]}")
            del fns
            torch.cuda.empty_cache()
    return rows


def sweep_small_m(bw, shapes, log):
    """Our int4 g128 / int8 small-M paths over a grid of (BLOCK_N, SPLIT_K, warps): what the heuristic leaves."""
    rows = []
    for fmt in (Int4Format(128), Int8Format()):
        for label, k, n in shapes:
            pws = _packed(fmt, k, n, copies_for(n * k // (2 if fmt.bits == 4 else 1)))
            size = nbytes(pws[0].qweight, pws[0].scales, pws[0].zeros)
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                heur = pick_config(m, pws[0], x.device)
                best = None
                for bn in (16, 32, 64, 128):
                    for split in (1, 2, 4, 8):
                        for warps in (4,):
                            bk = 128
                            cfg = MatmulConfig(1 if m == 1 else 16, bn, bk, split, warps, 3)
                            try:
                                us = time_calls([lambda pw=pw: dequant_matmul(x, pw, config=cfg) for pw in pws], reps=3)
                            except Exception as exc:  # noqa: BLE001
                                log(f"sweep {label} {cfg}: {type(exc).__name__}")
                                continue
                            if best is None or us < best[0]:
                                best = (us, cfg)
                us_h = time_calls([lambda pw=pw: dequant_matmul(x, pw) for pw in pws], reps=5)
                us_b = time_calls([lambda pw=pw: dequant_matmul(x, pw, config=best[1]) for pw in pws], reps=5)
                rows.append(dict(fmt=fmt.describe(), shape=label, m=m, heuristic=str(heur), heuristic_us=us_h,
                                 best=str(best[1]), best_us=us_b, best_frac_copy_bw=(size + 2 * m * (k + n)) / (us_b * 1e-6) / bw))
                log(f"sweep {fmt.describe():9s} {label:24s} M={m:2d} heuristic {us_h:8.1f} us  best {us_b:8.1f} us "
                    f"{best[1]}")
            del pws
            torch.cuda.empty_cache()
    return rows


GEMM_CONFIGS = {
    64: [(16, 64, 128, 4, 4, 4), (32, 64, 128, 1, 4, 4), (32, 64, 128, 2, 4, 4), (32, 64, 128, 4, 4, 4),
         (64, 64, 128, 1, 4, 4), (64, 64, 128, 2, 4, 4), (64, 128, 128, 1, 4, 3), (64, 128, 128, 2, 8, 3),
         (64, 64, 64, 2, 4, 4)],
    256: [(64, 64, 128, 1, 4, 4), (64, 64, 128, 2, 4, 4), (64, 128, 128, 1, 4, 3), (128, 64, 128, 1, 4, 3),
          (128, 128, 128, 1, 8, 3), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 4)],
    2048: [(128, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (128, 256, 64, 1, 8, 3), (128, 64, 128, 1, 4, 4),
           (64, 128, 128, 1, 4, 4), (128, 128, 64, 1, 8, 4), (256, 128, 64, 1, 8, 3)],
}


def sweep_gemm(bw, shapes, log):
    """Our prefill GEMM kernel (M > 16) over a grid of tiles, beside one Triton dequantization pass + cuBLAS and
    cuBLAS bf16 itself: what the heuristic (gemm_config) and the dequantize-then-cuBLAS threshold should be."""
    rows = []
    for fmt in (Int4Format(128), Int8Format()):
        for label, k, n in shapes:
            pws = _packed(fmt, k, n, copies_for(n * k // (2 if fmt.bits == 4 else 1)))
            bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
            for m, configs in GEMM_CONFIGS.items():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                res = dict(fmt=fmt.describe(), shape=label, m=m, configs={})
                for c in configs:
                    cfg = MatmulConfig(*c)
                    try:
                        us = time_calls([lambda pw=pw: dequant_matmul(x, pw, config=cfg) for pw in pws], reps=3)
                    except Exception as exc:  # noqa: BLE001
                        log(f"gemm sweep {label} {c}: {type(exc).__name__} {str(exc)[:80]}")
                        continue
                    res["configs"][str(c)] = us
                res["heuristic_us"] = time_calls([lambda pw=pw: dequant_matmul(x, pw) for pw in pws], reps=3)
                res["dequant_cublas_us"] = time_calls(
                    [lambda pw=pw: F.linear(x, dequantize_stack(pw, torch.bfloat16)[0]) for pw in pws], reps=3)
                res["cublas_bf16_us"] = time_calls([lambda w=w: F.linear(x, w) for w in bf16], reps=3)
                best = min(res["configs"].items(), key=lambda kv: kv[1]) if res["configs"] else (None, float("nan"))
                res["best"], res["best_us"] = best
                rows.append(res)
                log(f"gemm {fmt.describe():9s} {label:22s} M={m:5d} best {best[1]:8.1f} us {best[0]}  heuristic "
                    f"{res['heuristic_us']:8.1f}  dequant+cublas {res['dequant_cublas_us']:8.1f}  "
                    f"cublas bf16 {res['cublas_bf16_us']:8.1f}")
            del pws, bf16
            torch.cuda.empty_cache()
    return rows


def time_grid(configs, run, log, label):
    """``run(config) -> us`` for each config (a failing one is logged and skipped): ``({str(config): us}, best)``
    with ``best = (str(config), us)``."""
    timed = {}
    for c in configs:
        try:
            timed[str(c)] = run(c)
        except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is reported, not fatal
            log(f"{label} {c}: {type(exc).__name__} {str(exc)[:80]}")
    return timed, min(timed.items(), key=lambda kv: kv[1])


def sweep_gemv_int4(bw, shapes, log):
    """int4 g128 GEMV (M = 1): the 32-bit-word kernel over (BLOCK_N, groups per iteration (BLOCK_K / 128), SPLIT_K,
    warps), beside the generic path."""
    generic = MatmulPolicy(int4_word_gemv=False)
    rows = []
    fmt = Int4Format(128)
    for label, k, n in shapes:
        pws = _packed(fmt, k, n, copies_for(n * k // 2))
        size = nbytes(pws[0].qweight, pws[0].scales, pws[0].zeros)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        grid = [(1, bn, bk, split, warps, 3) for bn, bk, split, warps in
                itertools.product((32, 64, 128), (128, 256, 512), (1, 2, 4, 8), (2, 4))]
        res = dict(shape=label)

        def run(c, pws=pws, x=x):
            return time_calls([lambda pw=pw: dequant_matmul(x, pw, config=MatmulConfig(*c)) for pw in pws], reps=3)

        res["configs"], best = time_grid(grid, run, log, f"gemv sweep {label}")
        res["best"], res["best_us"] = best
        res["best_frac_copy_bw"] = (size + 2 * (k + n)) / (best[1] * 1e-6) / bw
        res["heuristic_us"] = time_calls([lambda pw=pw: dequant_matmul(x, pw) for pw in pws], reps=5)
        res["generic_path_us"] = time_calls([lambda pw=pw: dequant_matmul(x, pw, policy=generic) for pw in pws],
                                            reps=5)
        rows.append(res)
        log(f"gemv int4 {label:22s} best {best[1]:7.1f} us {best[0]} ({res['best_frac_copy_bw']:.0%} of copy BW), "
            f"heuristic {res['heuristic_us']:7.1f} us, generic path {res['generic_path_us']:7.1f} us")
        del pws
        torch.cuda.empty_cache()
    return rows


def sweep_gemv_binary(bw, shapes, log):
    """1-bit GEMV (M = 1): the 32-bit-word kernel over (BLOCK_N, words per iteration, SPLIT_K, warps), beside the
    int4 g128 GEMV (heuristic) on the same shape."""
    tile_kernel = MatmulPolicy(binary_word_gemv=False)
    rows = []
    for label, k, n in shapes:
        bws = _binary(k, n, copies_for(n * k // 8))
        size = nbytes(bws[0].qweight, bws[0].alpha, bws[0].beta)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        grid = [(1, bn, 32 * wpi, warps, 3, split) for bn, wpi, split, warps in
                itertools.product((64, 128, 256), (4, 8), (1, 2, 4), (4, 8))]
        res = dict(shape=label)

        def run(c, bws=bws, x=x):
            return time_calls([lambda bw=bw: binary_matmul(x, bw, config=BinaryConfig(*c)) for bw in bws], reps=3)

        res["configs"], best = time_grid(grid, run, log, f"binary gemv sweep {label}")
        res["best"], res["best_us"] = best
        res["best_frac_copy_bw"] = (size + 2 * (k + n)) / (best[1] * 1e-6) / bw
        res["heuristic"] = str(pick_binary_config(1, bws[0], x.device))
        res["heuristic_us"] = time_calls([lambda bw=bw: binary_matmul(x, bw) for bw in bws], reps=5)
        res["tile_kernel_us"] = time_calls([lambda bw=bw: binary_matmul(x, bw, policy=tile_kernel) for bw in bws],
                                           reps=5)
        del bws
        pws = _packed(Int4Format(128), k, n, copies_for(n * k // 2))
        res["int4_g128_us"] = time_calls([lambda pw=pw: dequant_matmul(x, pw) for pw in pws], reps=5)
        rows.append(res)
        log(f"gemv binary {label:22s} best {best[1]:7.1f} us {best[0]} ({res['best_frac_copy_bw']:.0%} of copy BW), "
            f"heuristic {res['heuristic_us']:7.1f} us, tile kernel {res['tile_kernel_us']:7.1f} us, "
            f"int4 g128 {res['int4_g128_us']:7.1f} us")
        del pws
        torch.cuda.empty_cache()
    return rows


def bench_scan(bw, log, with_reference=True):
    rows = []
    d, n = 2944, 16
    for b in (1, 8):
        for length in (512, 2048, 8192):
            g = torch.Generator(device="cuda").manual_seed(0)
            r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
            args = dict(u=r(b, length, d).bfloat16(), delta=(r(b, length, d) * 0.5).bfloat16(),
                        A=-torch.rand(d, n, device="cuda") - 0.1, B_ssm=r(b, length, n).bfloat16(),
                        C_ssm=r(b, length, n).bfloat16(), D_skip=r(d), z=r(b, length, d).bfloat16(), delta_bias=r(d))
            floor_bytes = b * length * (4 * d * 2 + 2 * n * 2) + 2 * b * d * n * 4
            us = time_calls([lambda: selective_scan_triton(**args)], reps=5, calls_per_graph=3)
            ref_us = None
            if with_reference and b * length <= 8 * 2048:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                selective_scan_ref(**args)
                torch.cuda.synchronize()
                ref_us = (time.perf_counter() - t0) * 1e6
            floor_us = floor_bytes / bw * 1e6
            rows.append(dict(batch=b, length=length, d_inner=d, d_state=n, us=us, reference_us=ref_us,
                             floor_us=floor_us, frac_of_floor=floor_us / us))
            log(f"scan B={b} L={length:5d}: {us:9.1f} us  floor {floor_us:7.1f} us ({floor_us / us:.0%})  "
                f"reference {ref_us if ref_us is None else round(ref_us)} us")
    return rows


def sweep_scan(bw, log):
    """Tile sizes of our scan (BLOCK_T, BLOCK_D, warps) at B = 1 and 8, L = 2048."""
    rows = []
    d, n, length = 2944, 16, 2048
    for b in (1, 8):
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        args = dict(u=r(b, length, d).bfloat16(), delta=(r(b, length, d) * 0.5).bfloat16(),
                    A=-torch.rand(d, n, device="cuda") - 0.1, B_ssm=r(b, length, n).bfloat16(),
                    C_ssm=r(b, length, n).bfloat16(), D_skip=r(d), z=r(b, length, d).bfloat16(), delta_bias=r(d))
        floor_us = (b * length * (4 * d * 2 + 2 * n * 2) + 2 * b * d * n * 4) / bw * 1e6
        for bt, bd, warps in [(16, 16, 4), (32, 16, 8), (32, 8, 4), (64, 8, 8), (64, 4, 4), (128, 4, 8), (16, 32, 8),
                              (8, 32, 4), (32, 32, 8), (8, 64, 8), (4, 128, 8), (1, 128, 4), (2, 128, 8)]:
            try:
                us = time_calls([lambda: selective_scan_triton(**args, method="assoc", block_t=bt, block_d=bd,
                                                                num_warps=warps)],
                                reps=3, calls_per_graph=2)
            except Exception as exc:  # noqa: BLE001
                log(f"scan sweep {bt},{bd},{warps}: {type(exc).__name__} {str(exc)[:100]}")
                continue
            rows.append(dict(batch=b, length=length, block_t=bt, block_d=bd, num_warps=warps, us=us,
                             frac_of_floor=floor_us / us))
            log(f"scan sweep B={b} T={bt:3d} D={bd:3d} w={warps}: {us:8.1f} us ({floor_us / us:.0%} of floor)")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values (smoke test)")
    ap.add_argument("--parts", default="matmul,sweep,scan")
    ap.add_argument("--methods", default="", help="comma-separated subset of the matmul methods (default: all)")
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default: all)")
    args = ap.parse_args()
    require_idle_gpu()
    warnings.filterwarnings("ignore")  # bitsandbytes warns on every int8 call
    log = lambda s: print(s, flush=True)  # noqa: E731
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    log(f"{props.name}: {props.multi_processor_count} SMs; copy bandwidth {bw / 1e12:.2f} TB/s")
    result = dict(device=props.name, torch=torch.__version__, copy_bandwidth=bw)
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    shapes = SHAPES[:3] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    m_values = [1, 16, 2048] if args.quick else M_VALUES
    parts = args.parts.split(",")
    out = Path(args.out)
    for part, fn in (("scan", lambda: bench_scan(bw, log)), ("matmul", lambda: bench_matmuls(bw, m_values, shapes, log, [m for m in args.methods.split(",") if m])),
                     ("sweep", lambda: sweep_small_m(bw, shapes[:4], log)),
                     ("scan_sweep", lambda: sweep_scan(bw, log)),
                     ("gemm_sweep", lambda: sweep_gemm(bw, [shapes[i] for i in (0, 1, 2, 6) if i < len(shapes)], log)),
                     ("gemv_sweep", lambda: sweep_gemv_int4(bw, [shapes[i] for i in (0, 1, 2, 3, 6) if i < len(shapes)], log)),
                     ("binary_gemv_sweep", lambda: sweep_gemv_binary(bw, shapes, log))):
        if part not in parts:
            continue
        try:
            result[part] = fn()
        except Exception:  # noqa: BLE001 - keep what the other parts measured
            result[part + "_error"] = traceback.format_exc()[-2000:]
            log(traceback.format_exc())
        out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
