"""Turn the benchmark JSON (bench_kernels.py, bench_e2e.py) into benchmarks/results.md tables, one merged
benchmarks/results.json and benchmarks/results.png (matplotlib, when installed).

    python benchmarks/report.py --kernels kernels.json --e2e e2e.json --outdir benchmarks
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PEERS = ["cublas_bf16", "ours_int8", "ours_int4_g128", "torch_int4_g128", "bnb_nf4", "bnb_int8"]


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def matmul_table(rows) -> list[str]:
    by = defaultdict(dict)
    for r in rows:
        by[(r["shape"], r["m"])][r["method"]] = r
    lines = ["| shape (K->N) | M | " + " | ".join(PEERS) + " | int4 vs bf16 | int4 % copy BW |",
             "|---|---|" + "---|" * (len(PEERS) + 2)]
    for (shape, m), d in by.items():
        cells = []
        for p in PEERS:
            r = d.get(p)
            cells.append("n/a" if r is None or "us" not in r else f"{r['us']:.1f}")
        ours, cub = d.get("ours_int4_g128", {}), d.get("cublas_bf16", {})
        speed = fmt(cub["us"] / ours["us"], 2) + "x" if "us" in ours and "us" in cub else "-"
        frac = f"{ours['frac_copy_bw']:.0%}" if "us" in ours else "-"
        lines.append(f"| {shape} | {m} | " + " | ".join(cells) + f" | {speed} | {frac} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", nargs="*", default=[])
    ap.add_argument("--e2e", nargs="*", default=[])
    ap.add_argument("--outdir", default="benchmarks")
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
        for r in e["rows"]:
            out.append(f"| {r['format']} | {r['weight_bytes'] / 1e9:.2f} | {fmt(r.get('decode_ms_b1'), 3)} | "
                       f"{fmt(r.get('decode_ms_b8'), 3)} | {fmt(r.get('prefill_tok_s_2048'), 0)} | "
                       f"{fmt(r.get('peak_gb'), 2)} | {fmt(r.get('decode_ms_b1_graph_modelstep'), 3)} | "
                       f"{fmt(r.get('eager_triton_ms_b1'), 2)} | {fmt(r.get('eager_reference_ms_b1'), 2)} | "
                       f"{fmt(r.get('eager_reference_ms_b8'), 2)} |")
        out.append("")
    outdir = Path(args.outdir)
    (outdir / "results.json").write_text(json.dumps(merged, indent=1))
    (outdir / "results_tables.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))
    try:
        plot(merged, outdir / "results.png")
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
