"""Compiler report of the decode linear kernel at BlackMamba-2.8B's shapes, with no GPU: registers, stack (spills),
SASS instruction count and mix per int4 code, for policy variants of bench_decode_linear.py (one input row, or with
``--rows N`` the several-row variants on the routed expert stacks).

    python benchmarks/inspect_decode_kernel.py [--shapes in_proj,fc1_gated] [--variants cuda_default,planes_bn4]
        [--arch 90] [--out DIR] [--no-stack] [--rows 8 --variants rowprog] [--rows 8 --dense --variants planes_mma]

"Per code" is the static SASS count times the threads launched over the codes a row reads: a loop body counts once,
and a program that returns at once (an idle expert's) counts in full.

Each variant's kernel is compiled the way its launch would be: :func:`decode_linear` runs on CPU tensors with the
kernel replaced by a recorder, which captures the arguments and meta-parameters; they are compiled for ``sm_<arch>``
(Triton's own ptxas, no driver needed) with Triton's launch specialisations (pointers and integers divisible by
16 marked so, integers equal to 1 folded, except a kernel's ``do_not_specialize`` arguments). ``--out`` also writes
the PTX and SASS of each. Read the figures as a guide to the arithmetic a variant costs, not as timings. **Compile
with the device's Triton version**: the report is the importable Triton's (printed first), and versions differ a
lot in layouts (session 21: a scan kernel compiled to 752 SASS instructions and 12 shuffles with Triton 3.9, 1,728
and 288 with the H200 image's 3.6). For the H200 image: ``python -m pip install --target /tmp/t36 triton==3.6.0``,
then run with ``PYTHONPATH=/tmp/t36:$PWD``. The test
suite runs it (``tests/qmamba/kernels/test_decode_compiles.py``): the CUDA default must compile for sm_90 and not
spill, which the interpreter alone cannot show.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_linear import shapes, variants, weight_forms  # noqa: E402

from qmamba.config import preset  # noqa: E402
from qmamba.kernels import decode_linear as dl  # noqa: E402
from qmamba.quant.layout import int4_x_planes  # noqa: E402

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.uint8: "u8", torch.int8: "i8", torch.int64: "i64"}


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **meta)`` records instead of launching."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((grid, args, meta))
        return launch


def compile_recorded(fn, args, meta, arch: int):
    """Compile ``fn`` for ``args`` / ``meta`` (one recorded launch) for ``sm_<arch>`` without a device."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    plain = set(getattr(fn, "do_not_specialize", ()) or ())  # launched unspecialised: no folding, no divisibility
    signature, constexprs, attrs = {}, {}, {}
    options = {k: meta[k] for k in ("num_warps", "num_stages", "maxnreg") if k in meta}
    for i, name in enumerate(names):
        if name in meta:
            constexprs[name] = meta[name]
            signature[name] = "constexpr"
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool) or value is None:
            constexprs[name] = value
            signature[name] = "constexpr"
        elif isinstance(value, int):
            if name in plain:
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                continue
            if value == 1:  # Triton folds integer arguments equal to 1
                constexprs[name] = 1
                signature[name] = "constexpr"
                continue
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def report(compiled) -> dict:
    """Registers, stack bytes, and the SASS instruction mix (opcode -> count) of a compiled kernel."""
    sass = _cuobjdump(compiled.asm["cubin"], "--dump-sass")
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", _cuobjdump(compiled.asm["cubin"], "--dump-resource-usage"))
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return dict(regs=int(usage.group(1)) if usage else -1, stack=int(usage.group(2)) if usage else -1, ops=ops,
                sass=sass)


def control_codes(sass: str) -> list[dict]:
    """Each SASS instruction of a cuobjdump listing (sm_70 and later) with its control code decoded from the high
    word of its 128-bit encoding (bits 41-61): ``addr``, ``text``, ``stall`` cycles, ``write_sb`` / ``read_sb`` (the
    scoreboard a variable-latency instruction signals when its result is written / its sources read; None: none),
    ``waits`` (the scoreboards it waits for before it issues). This is how to see where a kernel waits for a load:
    the first instruction whose ``waits`` holds the load's ``write_sb``."""
    lines = sass.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* 0x[0-9a-f]{16} \*/", line)
        hi = re.search(r"^\s+/\* (0x[0-9a-f]{16}) \*/", lines[i + 1])
        if not (m and hi):
            continue
        ctrl = int(hi.group(1), 16) >> 41
        wb, rb, mask = (ctrl >> 5) & 7, (ctrl >> 8) & 7, (ctrl >> 11) & 0x3F
        out.append(dict(addr=int(m.group(1), 16), text=m.group(2).rstrip(" ;"), stall=ctrl & 0xF,
                        write_sb=None if wb == 7 else wb, read_sb=None if rb == 7 else rb,
                        waits=[b for b in range(6) if mask >> b & 1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="in_proj,x_proj,out_proj,fc1_gated,fc2,head")
    ap.add_argument("--variants", default="cuda_default,cuda_default_float,planes_bn4,planes_denorm_bn8_rw")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", help="folder for the PTX and SASS of each variant")
    ap.add_argument("--no-stack", action="store_true", help="exit 1 if a variant spills (a stack frame)")
    ap.add_argument("--x-dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the input's type")
    ap.add_argument("--rows", type=int, default=1, help="input rows (2..8: bench_decode_linear.py's several-row "
                    "variants; expert stacks routed to experts 0, 1, 0, 2, 3, 1, 0, 4 in turn)")
    ap.add_argument("--dense", action="store_true", help="with --rows 2..8, the dense matrices too (the tensor-core "
                    "tiles of planes_mma, which the CUDA policy does not take: max_rows 1; by default several rows "
                    "compile the routed stacks only)")
    args = ap.parse_args()
    spilled = []
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    print(f"triton {triton.__version__} (compile with the device's version: see the module docstring)")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    table = variants(True, args.rows)
    routing = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4][:args.rows], dtype=torch.int32)
    recorder = _Recorder(dl._decode_linear_kernel)
    real = dl._decode_linear_kernel
    dl._decode_linear_kernel = recorder
    try:
        for shape, (n, k, experts, opts) in shapes(preset("blackmamba-2.8b")).items():
            if shape not in args.shapes.split(","):
                continue
            lead = (experts,) if experts else ()
            forms = weight_forms(torch.randn(*lead, n, k), n, k, torch.device("cpu"),
                                 {table[v][0] for v in args.variants.split(",")})
            x = torch.randn(args.rows, k, dtype=getattr(torch, args.x_dtype))
            kw = {"row_expert": torch.tensor([1], dtype=torch.int32) if args.rows == 1 else routing} if experts else {}
            if args.rows > 1 and not experts and not args.dense:
                continue  # several rows: the routed stacks only, unless --dense
            if opts.get("gated"):
                kw["gated"] = opts["gated"]
            if opts.get("row_scale"):
                kw["row_scale"] = torch.ones(args.rows)
            codes = n * k  # int4 codes of one matrix (one expert)
            for v in args.variants.split(","):
                form, policy = table[v]
                if policy == "general":
                    raise SystemExit(f"variant {v}: the general kernels are not the decode kernel")
                # PDL as the GPU would launch it: sm_90 and later (the H200), never before (pdl_supported)
                policy = dl.DecodePolicy(**{**policy.__dict__, "pdl": args.arch >= 90})
                out = torch.empty(args.rows, n // 2 if opts.get("gated") else n, dtype=torch.bfloat16)
                xpl = int4_x_planes(x) if policy.int4_x_planes else None  # word sums as the fused step has them
                dl.decode_linear(x, forms[form], out, policy=policy, x_planes=xpl,
                                 x_plane_sums=shape not in ("out_proj", "fc2"), **kw)
                grid, kargs, meta = recorder.calls[-1]
                compiled = compile_recorded(real, kargs, meta, args.arch)
                r = report(compiled)
                programs = grid[0] * grid[1]
                threads = 32 * meta["num_warps"]
                per_code = sum(r["ops"].values()) * threads * programs / codes / args.rows  # static: a loop once
                mix = ", ".join(f"{o}={c}" for o, c in r["ops"].most_common(8))
                print(f"{shape:10s} {v:24s} regs {r['regs']:3d} stack {r['stack']:4d} warps {meta['num_warps']} "
                      f"programs {programs:5d} SASS {sum(r['ops'].values()):5d} "
                      f"({per_code:4.1f} per code): {mix}", flush=True)
                if r["stack"] != 0:
                    spilled.append(f"{shape} {v}: stack {r['stack']} bytes")
                if out_dir:
                    (out_dir / f"{shape}_{v}.ptx").write_text(compiled.asm["ptx"])
                    (out_dir / f"{shape}_{v}.ttgir").write_text(compiled.asm["ttgir"])
                    (out_dir / f"{shape}_{v}.sass").write_text(r["sass"])
    finally:
        dl._decode_linear_kernel = real
    if args.no_stack and spilled:
        print("SPILLS:\n  " + "\n  ".join(spilled))
        sys.exit(1)


if __name__ == "__main__":
    main()
