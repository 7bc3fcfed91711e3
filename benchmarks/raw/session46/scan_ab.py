"""Chunked selective scans side by side on the GPU: the tree's kernel (its defaults and a few knob sets) against
copies of ``qmamba/kernels/selective_scan.py`` from other commits, each checked against the fp32 sequential
reference (bench_scan.py's check), then timed (bench_scan.py's inputs and timing), at BlackMamba-2.8B's shapes.

    PYTHONPATH=$PWD python benchmarks/raw/session46/scan_ab.py OLD.py [OTHER.py ...] [--knobs "unroll=4;n_segments=8"]
        [--shapes 1x512,8x512]

e.g. ``git show bb0fd0d~1:qmamba/kernels/selective_scan.py > /tmp/old.py`` (the kernel before session 46). Session
46 ran it (from a scratch copy) on the H100 twice: the figures are in benchmarks/results.md. Exits 1 when a check
fails."""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_scan import D_INNER, DT_RANK, D_STATE, check, floor_bytes, parse_knobs, scan_inputs  # noqa: E402
from timing import copies_for, time_calls  # noqa: E402

from qmamba.kernels import selective_scan as tree  # noqa: E402
from qmamba.kernels.selective_scan import selective_scan_ref  # noqa: E402

SHAPES = [(1, 512), (1, 1024), (1, 2048), (1, 4096), (2, 2048), (8, 512), (8, 2048), (8, 4096)]


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("others", nargs="+", help="copies of selective_scan.py to time beside the tree's")
    ap.add_argument("--knobs", default="unroll=4;unroll=8;n_segments=8;n_segments=16",
                    help="knob sets of the tree's kernel timed beside its defaults")
    ap.add_argument("--shapes", help="BxL pairs to time instead of the default list, e.g. 1x512,8x512")
    args = ap.parse_args()
    shapes = ([tuple(int(v) for v in part.split("x")) for part in args.shapes.split(",")] if args.shapes
              else SHAPES)
    variants = [(Path(p).stem, load(p, f"scan_{i}"), {}) for i, p in enumerate(args.others)]
    variants += [("tree", tree, {})] + [(",".join(f"{k}={v}" for k, v in kn.items()), tree, kn)
                                          for kn in parse_knobs(args.knobs)]
    dev, dtype, failures = torch.device("cuda"), torch.bfloat16, []
    for batch, length in shapes:
        inputs = scan_inputs(batch, length, D_INNER, D_STATE, DT_RANK, dev, dtype)
        ref = selective_scan_ref(**inputs)
        n_bytes = floor_bytes(batch, length, D_INNER, D_STATE, 2)
        copies = [scan_inputs(batch, length, D_INNER, D_STATE, DT_RANK, dev, dtype, seed=s)
                  for s in range(copies_for(n_bytes, cap=6))]
        base, line = None, []
        for name, module, knobs in variants:
            def fn(module=module, knobs=knobs, **a):
                return module.selective_scan_chunked(**a, **knobs)
            ok, err_y, err_state = check(fn, inputs, ref, dtype, dev)
            if not ok:
                failures.append(f"{name} B={batch} L={length}: y error {err_y:.2e}, state error {err_state:.2e}")
            us = time_calls([lambda a=a: fn(**a) for a in copies], reps=5)
            base = base or us
            line.append(f"{name} {us:7.1f} us ({base / us:4.2f}x){'' if ok else ' FAILED'}")
        print(f"B={batch} L={length:5d}: " + " | ".join(line), flush=True)
    print("\n".join(failures) or "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
