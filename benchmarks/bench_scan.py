"""Prefill selective scan: each Triton method checked against the fp32 sequential reference, then timed, at
BlackMamba-2.8B's shapes (d_inner 2944, d_state 16), with the time as a share of the memory floor.

    python benchmarks/bench_scan.py --json scan.json                      # GPU: B in 1,8 x L in 512,2048,4096
    python benchmarks/bench_scan.py --json scan.json --sweep              # ... plus a sweep of the chunked knobs
    python benchmarks/bench_scan.py --json scan.json --knobs "n_segments=32;unroll=8;method=assoc,block_t=64"
    python benchmarks/bench_scan.py --json scan.json --profile 3 --knobs ...   # no timing: each variant run 3 times
                                                                          #   (for ncu; checks still run first)
    TRITON_INTERPRET=1 python benchmarks/bench_scan.py --quick --json q.json   # CPU smoke test (tiny shapes)

Inputs are laid out as the mixer makes them: u and z the two strided halves of in_proj's [B, L, 2 d_inner]
output, B and C slices of x_proj's [B, L, dt_rank + 2 d_state] output, delta contiguous, all bf16 (fp32 with
--dtype float32); A = -exp(A_log) with A_log ~ log(1..N) (S4D-real init) plus noise, dt bias from dt in
[1e-3, 1e-1] log-uniform (Mamba's init), an fp32 initial state (the model always passes one).

Check (before timing, on fresh random inputs, outputs allocated from a NaN-filled cache): ||y - y_ref|| /
||y_ref|| and the same for the final state, against :func:`selective_scan_ref` (the fp32 sequential twin, run on
the same device). Limits: y 1e-2 for bf16 (its rounding), 1e-4 for fp32; state 1e-4. NaN fails. The script
exits 1 if any check fails.

Floor: bytes read (u, delta, z, B, C, initial state, A, D, dt bias) + written (y, final state) over --bandwidth
(default 3.3e12 B/s, near the H200's measured copy bandwidth; the copy bandwidth measured in the run is printed
too). Timing: benchmarks/timing.py (CUDA-graph replay, rotating input copies past L2, median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copies_for, copy_bandwidth, time_calls, require_idle_gpu  # noqa: E402

from qmamba.kernels.selective_scan import selective_scan_ref, selective_scan_triton  # noqa: E402

D_INNER, D_STATE, DT_RANK = 2944, 16, 92
TOL_Y = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
TOL_STATE = 1e-4


def scan_inputs(batch, length, d_inner, d_state, dt_rank, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    uz = r(batch, length, 2 * d_inner).to(dtype)
    dbc = r(batch, length, dt_rank + 2 * d_state).to(dtype)
    dt = torch.exp(torch.rand(d_inner, generator=g, device=device) * math.log(100.0) + math.log(1e-3))
    a_log = torch.log(torch.arange(1, d_state + 1, device=device).float())[None, :] + 0.3 * r(d_inner, d_state)
    return dict(u=uz[..., :d_inner], delta=(0.5 * r(batch, length, d_inner)).to(dtype), A=-torch.exp(a_log),
                B_ssm=dbc[..., dt_rank:dt_rank + d_state], C_ssm=dbc[..., dt_rank + d_state:], D_skip=r(d_inner),
                z=uz[..., d_inner:], delta_bias=dt + torch.log(-torch.expm1(-dt)),  # softplus^-1(dt)
                initial_state=0.1 * r(batch, d_inner, d_state))


def floor_bytes(batch, length, d_inner, d_state, elt):
    seq = batch * length * (4 * d_inner + 2 * d_state) * elt                # u, delta, z, B, C read; y written
    return seq + 2 * batch * d_inner * d_state * 4 + d_inner * (d_state + 2) * 4


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("nan")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def poison_cache(device, n_bytes):
    """Fill (then free) a block of the caching allocator with NaN so an output element a kernel never writes
    shows up as NaN rather than as an earlier call's correct value."""
    if device.type == "cuda":
        torch.empty(n_bytes // 4 + 1024, device=device).fill_(float("nan"))


def check(fn, args, ref, dtype, device):
    poison_cache(device, 4 * ref[0].numel() * 4)
    y, state = fn(**args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ey, es = rel_err(y, ref[0]), rel_err(state, ref[1])
    ok = ey <= TOL_Y[dtype] and es <= TOL_STATE  # NaN compares False
    return ok, ey, es


def time_variant(fn, copies, device):
    """Microseconds per call (CUDA: graph replay over the input copies; CPU: one interpreted call, wall clock)."""
    if device.type == "cuda":
        return time_calls([lambda a=a: fn(**a) for a in copies], reps=5)
    t0 = time.perf_counter()
    fn(**copies[0])
    return (time.perf_counter() - t0) * 1e6


def parse_knobs(text: str) -> list[dict]:
    """``"lanes=2;method=assoc,block_t=64"`` -> ``[{"lanes": 2}, {"method": "assoc", "block_t": 64}]``
    (integers, ``true`` / ``false``, else strings; ``method`` picks the launcher, chunked by default, the rest are
    its tuning args)."""
    sets = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kw = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            v = value.strip().lower()
            kw[key.strip()] = True if v == "true" else False if v == "false" else int(v) if v.lstrip("-").isdigit() \
                else v
        sets.append(kw)
    return sets


def variants(device, sweep, knob_sets=()):
    """name -> callable(**scan args). The chunked knobs swept with --sweep (or given with --knobs) are the
    launcher's tuning args."""
    out = {"assoc": lambda **a: selective_scan_triton(**a, method="assoc"),
           "chunked": lambda **a: selective_scan_triton(**a, method="chunked")}
    for kw in knob_sets:  # a set's method (method=assoc) or the chunked one
        kw = dict(kw)
        method = kw.pop("method", "chunked")
        out[" ".join([method] + [f"{k}={v}" for k, v in kw.items()])] = \
            lambda kw=kw, method=method, **a: selective_scan_triton(**a, method=method, **kw)
    if sweep:
        grid = list(itertools.product((1, 2), (1, 2), (4, 8), (1, 2, 4, 8, 16)))
        for warps, lanes, unroll, segs in grid:
            kw = dict(num_warps=warps, lanes=lanes, unroll=unroll, n_segments=segs)
            out[f"chunked w{warps} l{lanes} u{unroll} s{segs}"] = \
                lambda kw=kw, **a: selective_scan_triton(**a, method="chunked", **kw)
        for segs in (24, 32, 48, 64):  # beyond chunked_segments' cap of 16 (the default unroll and warps)
            out[f"chunked w1 l1 u4 s{segs}"] = \
                lambda segs=segs, **a: selective_scan_triton(**a, method="chunked", n_segments=segs)
        for segs in (1, 16):  # one knob set, 4 steps a trip (session 18's first sweep labelled these rows u8 while
            #                   they ran the default unroll of 4: call3_scan.log)
            for kw in (dict(fast_exp=True), dict(fast_exp=False), dict(bc_fp32=False)):
                knob, value = next(iter(kw.items()))
                out[f"chunked w1 l1 u4 s{segs} {knob}={value}"] = \
                    lambda kw=kw, segs=segs, **a: selective_scan_triton(**a, method="chunked", n_segments=segs,
                                                                       unroll=4, **kw)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (runs on CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of the chunked method's knobs")
    ap.add_argument("--knobs", default="", help="chunked knob sets to time beside the defaults: 'k=v,k=v;k=v'")
    ap.add_argument("--profile", type=int, default=0,
                    help="no timing: run each checked variant this many times (for a profiler such as ncu)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--lengths", default="512,2048,4096")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--bandwidth", type=float, default=3.3e12, help="bytes/s for the floor (default 3.3e12)")
    args = ap.parse_args(argv)
    require_idle_gpu()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.quick:
        shapes = [(1, 37, 24, 16, 6), (2, 20, 24, 16, 6)]  # ragged L, B = 1 and 2
    else:
        shapes = [(int(b), int(length), D_INNER, D_STATE, DT_RANK) for b in args.batches.split(",")
                  for length in args.lengths.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, dtype=args.dtype, floor_bandwidth=args.bandwidth,
                  reference="selective_scan_ref (fp32 sequential PyTorch scan) on the same device",
                  tolerance=dict(y=TOL_Y[dtype], state=TOL_STATE, metric="||got - ref|| / ||ref||"), rows=[])
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        result["copy_bandwidth_measured"] = copy_bandwidth()
        log(f"{result['device']}: copy bandwidth measured {result['copy_bandwidth_measured'] / 1e12:.2f} TB/s; "
            f"floor uses {args.bandwidth / 1e12:.2f} TB/s")
    fns = variants(device, args.sweep and not args.quick, parse_knobs(args.knobs))
    failed = []
    for b, length, d, n, r in shapes:
        fb = floor_bytes(b, length, d, n, torch.empty(0, dtype=dtype).element_size())
        floor_us = fb / args.bandwidth * 1e6
        base = scan_inputs(b, length, d, n, r, device, dtype, seed=1)
        ref = selective_scan_ref(**base)
        copies = [base] + [scan_inputs(b, length, d, n, r, device, dtype, seed=10 + i)
                           for i in range(copies_for(fb) - 1 if device.type == "cuda" else 0)]
        assoc_us = None
        for name, fn in fns.items():
            row = dict(batch=b, length=length, d_inner=d, d_state=n, variant=name, floor_us=floor_us)
            try:
                ok, ey, es = check(fn, base, ref, dtype, device)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a failed row, not a crash
                ok, ey, es = False, float("nan"), float("nan")
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row.update(check_ok=ok, rel_err_y=ey, rel_err_state=es)
            if ok and args.profile:
                for _ in range(args.profile):
                    fn(**base)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            elif ok:
                us = time_variant(fn, copies, device)
                row.update(us=us, frac_of_floor=floor_us / us)
                assoc_us = us if name == "assoc" else assoc_us
                row["speedup_vs_assoc"] = assoc_us / us if assoc_us else None
            else:
                failed.append(f"B={b} L={length} {name}")
            result["rows"].append(row)
            speed = f"{row['speedup_vs_assoc']:6.2f}x" if row.get("speedup_vs_assoc") else "      -"
            timing = ("   CHECK FAILED" if not ok else "   checked, profiled" if args.profile else
                      f"{row['us']:9.1f} us {row['frac_of_floor']:6.1%} of floor {speed}")
            log(f"B={b} L={length:5d} {name:28s} {timing}   err y {ey:.1e} state {es:.1e}"
                + (f"  {row['error']}" if "error" in row else ""))
        del copies, base, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.json).write_text(json.dumps(result, indent=1))
    # the table last (the default variants; the sweep's rows are in the log above and the JSON); none when profiling
    if not args.profile:
        log(f"\nfloor = bytes read + written / {args.bandwidth / 1e12:.2f} TB/s; reference = fp32 sequential "
            f"selective_scan_ref on {device.type}; {args.dtype} inputs")
        log("|  B |     L | floor us | assoc us | chunked us | chunked % floor | speedup |")
        log("|---:|------:|---------:|---------:|-----------:|----------------:|--------:|")
    for b, length, *_ in ([] if args.profile else shapes):
        rows = {r["variant"]: r for r in result["rows"] if r["batch"] == b and r["length"] == length}
        a, c = rows.get("assoc", {}), rows.get("chunked", {})
        fmt = lambda v, f: format(v, f) if v is not None else "FAIL"  # noqa: E731
        log(f"| {b:2d} | {length:5d} | {a.get('floor_us', 0):8.1f} | {fmt(a.get('us'), '8.1f')} | "
            f"{fmt(c.get('us'), '10.1f')} | {fmt(c.get('frac_of_floor'), '15.1%')} | "
            f"{fmt(c.get('speedup_vs_assoc'), '6.2f')}x |")
    result["failed"] = failed
    Path(args.json).write_text(json.dumps(result, indent=1))
    if failed:
        log(f"CHECK FAILED: {', '.join(failed)}")
        return 1
    log(f"all checks passed; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
