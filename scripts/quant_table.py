"""Reproduce the quantization table of docs/quantization.md on a float checkpoint (default: the trained fixture).

    python scripts/quant_table.py [--model qmamba/assets/tiny-blackmamba] [--out /tmp/quant_table]
           [--nsamples 128 --seq-len 256] [--eval-tokens 0 (all held-out)] [--eval-seq-len 256]

For each row (fp32, int8 RTN/GPTQ, int4 RTN/GPTQ/AWQ at g128 and g64, int4 g128 GPTQ with --route-aware (and
--refit-routers) on MoE models, 1-bit PTB, 1-bit PTB + distillation, with or without block matching first) it
quantizes with the same library call as
`qmamba quantize` (calibration: `--calib full`, the TRAIN split of the full corpus, seeded), then measures held-out
perplexity (sliding window, corpus:heldout), size on disk, router top-1 agreement with the float model on held-out
windows, and the quantize time. Prints a Markdown table and writes it (plus JSON) under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROWS = [  # label, bits, group, method, extra options (route_aware budget, refit_routers, distill steps)
    ("int8 RTN", 8, None, "rtn", {}),  # int8: one scale per output channel, no group size
    ("int8 GPTQ", 8, None, "gptq", {}),
    ("int4 g128 RTN", 4, 128, "rtn", {}),
    ("int4 g128 GPTQ", 4, 128, "gptq", {}),
    ("int4 g128 AWQ", 4, 128, "awq", {}),
    ("int4 g64 RTN", 4, 64, "rtn", {}),
    ("int4 g64 GPTQ", 4, 64, "gptq", {}),
    ("int4 g64 AWQ", 4, 64, "awq", {}),
    ("int4 g128 GPTQ route-aware", 4, 128, "gptq", {"route_aware": 0.06}),  # MoE models (docs/routing.md)
    ("int4 g128 GPTQ route-aware + refit", 4, 128, "gptq", {"route_aware": 0.06, "refit_routers": True}),
    ("1-bit PTB", 1, None, None, {}),
    ("1-bit PTB + distill", 1, None, None, {"distill": True}),  # --distill-steps / --distill-time
    ("1-bit PTB + block match + distill", 1, None, None, {"distill": True, "block_steps": True}),  # + --block-steps
]
MOE_ONLY = {"route_aware", "refit_routers"}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main():
    from qmamba import load_model
    from qmamba.calib.distill import DistillOptions
    from qmamba.calib.pipeline import CalibOptions
    from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
    from qmamba.eval import encode_text_spec, perplexity, router_agreement, text_windows
    from qmamba.tokenizer import resolve_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "qmamba/assets/tiny-blackmamba"))
    ap.add_argument("--out", default="/tmp/quant_table")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--data", default="corpus:heldout")
    ap.add_argument("--calib", default="full", help="calibration text: full (the full train split, as for the "
                    "committed tables; needs $QMAMBA_DATA_DIR or ../shared/data), corpus (the slice shipped) or a file")
    ap.add_argument("--eval-tokens", type=int, default=0, help="0 = the whole held-out text")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--router-windows", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated row labels")
    ap.add_argument("--device", default="cpu", help="calibration and evaluation device (cpu, cuda)")
    ap.add_argument("--backend", default="reference", help="model backend for evaluation")
    ap.add_argument("--distill-steps", type=int, default=300, help="1-bit distillation steps (upper bound)")
    ap.add_argument("--distill-time", type=float, default=None, help="1-bit distillation seconds (upper bound)")
    ap.add_argument("--block-steps", type=int, default=100,
                    help="block-output matching steps per block of the 'block match' row (inside --distill-time)")
    ap.add_argument("--ste", action="store_true", help="distillation also trains the signs (and the norms)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def load(path):
        return load_model(path, device=args.device, dtype=torch.float32, backend=args.backend)

    fp = load(args.model)
    tok = resolve_tokenizer(args.model)
    ids = encode_text_spec(tok, args.data, args.eval_tokens or None)
    windows = text_windows(ids, args.eval_seq_len, args.router_windows)

    def measure(model):
        return perplexity(model, ids, args.eval_seq_len, args.eval_seq_len, batch_size=args.eval_batch,
                          progress=False)["ppl"]

    results = [{"label": "fp32", "ppl": measure(fp), "bytes": dir_bytes(Path(args.model)), "router": 1.0,
                "seconds": 0.0}]
    print(f"fp32: ppl {results[0]['ppl']:.4f}", flush=True)
    moe = any(not block.is_mamba for block in fp.blocks)
    rows = [r for r in ROWS if (not args.only or r[0] in args.only.split(",")) and (moe or not MOE_ONLY & set(r[4]))]
    for label, bits, group, method, extra in rows:
        target = out / label.replace(" ", "-").replace("+", "and")
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        distill = (DistillOptions(steps=args.distill_steps, time_budget=args.distill_time, progress=False,
                                  block_steps=args.block_steps if extra.get("block_steps") else 0,
                                  ste=args.ste, train_norms=args.ste)
                   if extra.get("distill") else None)
        options = QuantizeOptions(bits=bits, group_size=group, method=method, calib=[args.calib],
                                  nsamples=args.nsamples, seq_len=args.seq_len, device=args.device,
                                  calibration=CalibOptions(progress=False,
                                                           refit_routers=extra.get("refit_routers", False)),
                                  route_aware=extra.get("route_aware"), distill=distill)
        info = quantize_checkpoint(args.model, target, options, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        q = load(target)
        agree = router_agreement(fp, q, windows)["overall"]
        row = {"label": label, "ppl": measure(q), "bytes": dir_bytes(target), "router": agree, "seconds": seconds,
               "calib_router": (info.get("router_agreement") or {}).get("overall"), "calib_seconds": info["seconds"],
               "sqnr_db": {r["kind"]: r["sqnr_db"] for r in info["summary"]}}
        results.append(row)
        print(f"{label}: ppl {row['ppl']:.4f}  size {row['bytes'] / 2**20:.3f} MiB  router {100 * agree:.2f}%  "
              f"{seconds:.1f} s", flush=True)

    base = results[0]["ppl"]
    lines = ["| model | held-out ppl | vs fp32 | size on disk | router top-1 agreement | quantize time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% | "
                     f"{r['bytes'] / 2**20:.2f} MiB | {100 * r['router']:.2f}% | {r['seconds']:.1f} s |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    (out / "results.json").write_text(json.dumps({"args": vars(args), "tokens": int(ids.numel()), "device": device,
                                                  "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
