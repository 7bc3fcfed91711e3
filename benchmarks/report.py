"""Turn the benchmark JSON (bench_kernels.py, bench_e2e.py) of one machine into markdown tables, one merged JSON and
a PNG plot (matplotlib, when installed): ``results_tables_<tag>.md``, ``results_<tag>.json``, ``results_<tag>.png``.

    python benchmarks/report.py --kernels kernels.json [sweep.json ...] --e2e e2e.json --tag h100 --outdir benchmarks
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PEERS = ["cublas_bf16", "ours_int8", "ours_int4_g128", "ours_binary", "torch_int4_g128", "bnb_nf4", "bnb_int8"]


ORDER = {"bf16": 0, "int8": 1, "int4_g128": 2, "binary+int4_g128": 3}


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def matmul_table(rows) -> list[str]:
    by = defaultdict(dict)
    for r in rows:
        by[(r["shape"], r["m"])][r["method"]] = r
    present = [p for p in PEERS if any(p in d for d in by.values())]
    binary = "ours_binary" in present
    lines = ["| shape (K->N) | M | " + " | ".join(present) + " | int4 vs bf16 | int4 % copy BW |"
             + (" 1-bit vs int4 | 1-bit % copy BW |" if binary else ""),
             "|---|---|" + "---|" * (len(present) + 2 + 2 * binary)]
    for (shape, m), d in by.items():
        cells = []
        for p in present:
            r = d.get(p)
            cells.append("n/a" if r is None or "us" not in r else f"{r['us']:.1f}")
        ours, cub, bits1 = d.get("ours_int4_g128", {}), d.get("cublas_bf16", {}), d.get("ours_binary", {})
        speed = fmt(cub["us"] / ours["us"], 2) + "x" if "us" in ours and "us" in cub else "-"
        frac = f"{ours['frac_copy_bw']:.0%}" if "us" in ours else "-"
        line = f"| {shape} | {m} | " + " | ".join(cells) + f" | {speed} | {frac} |"
        if binary:
            b_speed = fmt(ours["us"] / bits1["us"], 2) + "x" if "us" in ours and "us" in bits1 else "-"
            line += f" {b_speed} | " + (f"{bits1['frac_copy_bw']:.0%}" if "us" in bits1 else "-") + " |"
        lines.append(line)
    return lines


def table(title: str, header: list[str], lines: list[str]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + lines + [""]


def sweep_tables(k) -> list[str]:
    out = []
    if k.get("gemv_sweep"):
        out += table("int4 g128 GEMV (M = 1) sweep: (block_m, BLOCK_N, BLOCK_K, split_k, warps, stages)",
                     ["shape", "heuristic us", "best us", "best config", "best % copy BW", "generic path us"],
                     [f"| {r['shape']} | {r['heuristic_us']:.1f} | {r['best_us']:.1f} | {r['best']} | "
                      f"{r['best_frac_copy_bw']:.0%} | {fmt(r.get('generic_path_us'))} |" for r in k["gemv_sweep"]])
    if k.get("gemm_sweep"):
        out += table("Prefill GEMM sweep (M > 16): best tile config vs heuristic, Triton dequantization + cuBLAS, "
                     "cuBLAS bf16", ["format", "shape", "M", "best us", "best config", "heuristic us",
                                     "dequant + cuBLAS us", "cuBLAS bf16 us"],
                     [f"| {r['fmt']} | {r['shape']} | {r['m']} | {fmt(r.get('best_us'))} | {r.get('best')} | "
                      f"{r['heuristic_us']:.1f} | {r['dequant_cublas_us']:.1f} | {r['cublas_bf16_us']:.1f} |"
                      for r in k["gemm_sweep"]])
    if k.get("binary_gemv_sweep"):
        out += table("1-bit GEMV (M = 1) sweep: (block_m, BLOCK_N, BLOCK_K = 32 x words per iteration, warps, "
                     "stages, split_k)", ["shape", "heuristic us", "best us", "best config", "best % copy BW",
                                          "tile kernel us", "int4 g128 us"],
                     [f"| {r['shape']} | {r['heuristic_us']:.1f} | {r['best_us']:.1f} | {r['best']} | "
                      f"{r['best_frac_copy_bw']:.0%} | {r['tile_kernel_us']:.1f} | {r['int4_g128_us']:.1f} |"
                      for r in k["binary_gemv_sweep"]])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", nargs="*", default=[])
    ap.add_argument("--e2e", nargs="*", default=[])
    ap.add_argument("--outdir", default="benchmarks")
    ap.add_argument("--tag", required=True, help="machine tag of the output file names, e.g. h100")
    args = ap.parse_args()
    merged = {"kernels": {}, "e2e": {}}
    for path in args.kernels:
        data = json.loads(Path(path).read_text())
        for key, value in data.items():
            if isinstance(value, list) and key in merged["kernels"]:
                merged["kernels"][key] += value
            else:
                merged["kernels"][key] = value
    for path in args.e2e:
        data = json.loads(Path(path).read_text())
        merged["e2e"].setdefault("rows", []).extend(data.get("rows", []))
        merged["e2e"].update({k: v for k, v in data.items() if k != "rows"})
    k = merged["kernels"]
    out = []
    if k:
        bw = k.get("copy_bandwidth")
        out += [f"Device: {k.get('device')}, torch {k.get('torch')}, triton {k.get('triton')}; measured copy "
                f"bandwidth {bw / 1e12:.2f} TB/s (read + write).", ""]
    if k.get("matmul"):
        out += ["## Dequant GEMV / GEMM (median us per call, CUDA-graph timed, rotating weight copies)", ""]
        out += matmul_table(k["matmul"]) + [""]
    out += sweep_tables(k)
    if k.get("sweep"):
        out += ["## Small-M config sweep of our kernel (BLOCK_N x SPLIT_K grid, 4 warps)", "",
                "| format | shape | M | heuristic us | best us | best config | best % copy BW |",
                "|---|---|---|---|---|---|---|"]
        for r in k["sweep"]:
            best = r["best"].replace("MatmulConfig", "").replace("block_", "").replace("num_", "")
            out.append(f"| {r['fmt']} | {r['shape']} | {r['m']} | {r['heuristic_us']:.1f} | {r['best_us']:.1f} | {best} | "
                       f"{r['best_frac_copy_bw']:.0%} |")
        out.append("")
    if k.get("scan"):
        out += ["## Selective scan prefill (d_inner 2944, d_state 16, bf16 in/out, fp32 state)", "",
                "| B | L | ours us | memory floor us | % of floor | PyTorch sequential reference us |",
                "|---|---|---|---|---|---|"]
        for r in k["scan"]:
            out.append(f"| {r['batch']} | {r['length']} | {r['us']:.1f} | {r['floor_us']:.1f} | "
                       f"{r['frac_of_floor']:.0%} | {fmt(r.get('reference_us'), 0)} |")
        out.append("")
    e = merged["e2e"]
    if e.get("rows"):
        out += [f"## End to end: {e.get('preset')} (random weights, RTN), {e.get('device')}", "",
                "| format | weights GB | decode ms/token B=1 (graph) | B=8 | prefill tok/s @2048 | peak GB | "
                "graph of model.step B=1 | eager triton B=1 | eager reference B=1 | eager reference B=8 |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(e["rows"], key=lambda r: ORDER.get(r["format"], 9)):
            out.append(f"| {r['format']} | {r['weight_bytes'] / 1e9:.2f} | {fmt(r.get('decode_ms_b1'), 3)} | "
                       f"{fmt(r.get('decode_ms_b8'), 3)} | {fmt(r.get('prefill_tok_s_2048'), 0)} | "
                       f"{fmt(r.get('peak_gb'), 2)} | {fmt(r.get('decode_ms_b1_graph_modelstep'), 3)} | "
                       f"{fmt(r.get('eager_triton_ms_b1'), 2)} | {fmt(r.get('eager_reference_ms_b1'), 2)} | "
                       f"{fmt(r.get('eager_reference_ms_b8'), 2)} |")
        out.append("")
    outdir = Path(args.outdir)
    (outdir / f"results_{args.tag}.json").write_text(json.dumps(merged, indent=1))
    (outdir / f"results_tables_{args.tag}.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))
    try:
        plot(merged, outdir / f"results_{args.tag}.png")
    except ImportError:
        print("matplotlib not installed: no plot")


def plot(merged, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = merged["kernels"].get("matmul", [])
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return
    cols = min(4, len(shapes))
    fig, axes = plt.subplots(-(-len(shapes) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(shapes) // cols)),
                             squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        for method in PEERS:
            pts = sorted((r["m"], r["us"]) for r in rows if r["shape"] == shape and r["method"] == method
                         and "us" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("us per call")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
