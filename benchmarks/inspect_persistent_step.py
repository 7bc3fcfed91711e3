"""Compiler report of the persistent decode step (qmamba.persistent_step) at BlackMamba-2.8B's shapes, with no GPU.

    python benchmarks/inspect_persistent_step.py [--layers 2] [--batch 1] [--formats int4_g128,bf16]
        [--variants persist,persist_bn16] [--source DIR] [--no-stack]

The step is recorded on CPU (random weights, ``--layers`` of the preset's layers: the launch kinds, hence the
generated kernel, are the same for any depth) under the CUDA policy of a bench_decode.py variant, and the generated
kernel is compiled for sm_90 (Triton's ptxas, as ``inspect_decode_kernel.py`` does): its registers, stack, SASS
instructions, L2 bulk prefetches (``UBLKPF``), loads through the non-coherent read-only path (``nc``: PTX
``ld.global.nc``, SASS ``LDG...CONSTANT``), and the programs an H200 multiprocessor holds at once by registers (4 warps
a program: the persistent grid is that times 132). ``--source`` writes the generated module. Compile with the
device's Triton (see inspect_decode_kernel.py): ``PYTHONPATH=/tmp/t36:$PWD``. Exits 1 when a kernel has a
non-coherent load (one launch's output is the next one's input inside the same kernel: such a load may return a
stale value), or when ``--no-stack`` and a kernel spills more than the calls' own frames (over 64 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
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


def non_coherent_loads(ptx: str, sass: str) -> int:
    """Loads of a compiled kernel through the non-coherent read-only (texture) path: PTX ``ld.global.nc``, and the
    SASS ``LDG`` forms ptxas makes of them (``.CONSTANT``). Inside a persistent kernel such a load of a buffer that
    an earlier launch of the chain wrote may return what the buffer held before (that path is not kept coherent
    with the kernel's own writes), so the chain must have none."""
    ptx_nc = len(re.findall(r"\bld\.global\.nc\b", ptx))
    sass_nc = sum(1 for line in sass.splitlines() if re.search(r"\bLDG\S*\.CONSTANT\b", line))
    return max(ptx_nc, sass_nc)


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
    spilled, incoherent = [], []
    for fmt in args.formats.split(","):
        for variant in args.variants.split(","):
            policy = policy_variant(DecodePolicy.cuda(132, True), variant)
            launches = record(args.layers, fmt, policy, args.batch)
            chain = persistent.PersistentChain(launches, "cpu", programs=1, num_warps=policy.num_warps,
                                               prefetch=policy.persistent_prefetch)
            call_args, meta = chain._launch_args(132)
            if policy.persistent_maxnreg:
                meta["maxnreg"] = policy.persistent_maxnreg
            compiled = compile_recorded(chain.kernel, call_args, meta, 90)
            r = report(compiled)
            nc = non_coherent_loads(compiled.asm["ptx"], r["sass"])
            per_sm = 65536 // (-(-r["regs"] // 8) * 8 * 32 * policy.num_warps)
            print(f"{fmt:9s} {variant:22s} launches {len(launches):3d} kinds {len(chain.kinds):2d} regs {r['regs']:3d} "
                  f"stack {r['stack']:3d} SASS {sum(r['ops'].values()):5d} UBLKPF {r['ops']['UBLKPF']:2d} "
                  f"nc {nc} programs/SM {per_sm} max tiles {chain.max_tiles}", flush=True)
            if args.source:
                out = Path(args.source)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{fmt}_{variant}.py").write_text(chain.source)
            if r["stack"] > 64:
                spilled.append(f"{fmt} {variant}")
            if nc:
                incoherent.append(f"{fmt} {variant}")
    if incoherent:
        sys.exit(f"non-coherent loads: {', '.join(incoherent)}")
    if args.no_stack and spilled:
        sys.exit(f"spills: {', '.join(spilled)}")


if __name__ == "__main__":
    main()
