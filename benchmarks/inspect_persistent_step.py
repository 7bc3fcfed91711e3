"""Compiler report of the persistent decode step (qmamba.persistent_step) at BlackMamba-2.8B's shapes, with no GPU.

    python benchmarks/inspect_persistent_step.py [--layers 2] [--batch 1] [--formats int4_g128,bf16]
        [--variants persist,persist_bn16] [--source DIR] [--no-stack]

The step is recorded on CPU (random weights, ``--layers`` of the preset's layers: the launch kinds, hence the
generated kernel, are the same for any depth) under the CUDA policy of a bench_decode.py variant, and the generated
kernel is compiled for sm_90 (Triton's ptxas, as ``inspect_decode_kernel.py`` does): its registers, stack, SASS
instructions, L2 bulk prefetches (``UBLKPF``), and the programs an H200 multiprocessor holds at once by registers
(4 warps a program: the persistent grid is that times 132). ``--source`` writes the generated module. Compile with
the device's Triton (see inspect_decode_kernel.py): ``PYTHONPATH=/tmp/t36:$PWD``. Exits 1 when ``--no-stack`` and a
kernel spills more than the calls' own frames (over 64 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import policy_variant  # noqa: E402
from inspect_decode_kernel import compile_recorded, report  # noqa: E402

from qmamba.config import preset  # noqa: E402
from qmamba.kernels import persistent  # noqa: E402
from qmamba.kernels.decode_linear import DecodePolicy  # noqa: E402
from qmamba.persistent_step import PersistentDecodeStep  # noqa: E402
from qmamba.quant.formats import Int4Format  # noqa: E402
from qmamba.testing import quantize_rtn, random_model  # noqa: E402


def record(layers: int, fmt: str, policy: DecodePolicy, batch: int = 1) -> list:
    """The launches of one step of the preset's first ``layers`` layers at ``batch`` rows, as the policy runs it."""
    base = preset("blackmamba-2.8b")
    cfg = dataclasses.replace(base, layers=base.layers[:layers])
    model = random_model(cfg, "cpu", dtype=torch.bfloat16)
    if fmt == "int4_g128":
        model = quantize_rtn(model, Int4Format(128))
    elif fmt != "bf16":
        raise SystemExit(f"unknown format {fmt!r} (int4_g128, bf16)")
    step = PersistentDecodeStep(model, policy, programs=1)
    return step.record(torch.zeros(batch, dtype=torch.long), model.new_state(batch))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--formats", default="int4_g128,bf16")
    ap.add_argument("--variants", default="persist")
    ap.add_argument("--source", help="folder for the generated module of each format and variant")
    ap.add_argument("--no-stack", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    print(f"triton {triton.__version__}", flush=True)
    spilled = []
    for fmt in args.formats.split(","):
        for variant in args.variants.split(","):
            policy = policy_variant(DecodePolicy.cuda(132, True), variant)
            launches = record(args.layers, fmt, policy, args.batch)
            chain = persistent.PersistentChain(launches, "cpu", programs=1, num_warps=policy.num_warps,
                                               prefetch=policy.persistent_prefetch)
            call_args, meta = chain._launch_args(132)
            if policy.persistent_maxnreg:
                meta["maxnreg"] = policy.persistent_maxnreg
            r = report(compile_recorded(chain.kernel, call_args, meta, 90))
            per_sm = 65536 // (-(-r["regs"] // 8) * 8 * 32 * policy.num_warps)
            print(f"{fmt:9s} {variant:22s} launches {len(launches):3d} kinds {len(chain.kinds):2d} regs {r['regs']:3d} "
                  f"stack {r['stack']:3d} SASS {sum(r['ops'].values()):5d} UBLKPF {r['ops']['UBLKPF']:2d} "
                  f"programs/SM {per_sm} max tiles {chain.max_tiles}", flush=True)
            if args.source:
                out = Path(args.source)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{fmt}_{variant}.py").write_text(chain.source)
            if r["stack"] > 64:
                spilled.append(f"{fmt} {variant}")
    if args.no_stack and spilled:
        sys.exit(f"spills: {', '.join(spilled)}")


if __name__ == "__main__":
    main()
