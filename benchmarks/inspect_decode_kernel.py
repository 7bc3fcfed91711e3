"""Compiler report of the decode linear kernel at one of BlackMamba-2.8B's shapes (run on the GPU): registers,
spills, and the PTX / SASS / TTGIR of each given policy variant, written to a folder for reading off the device.

    python benchmarks/inspect_decode_kernel.py --out DIR [--shape in_proj] [--variants bf16_bn4,planes_bn4]

Variant names are those of bench_decode_linear.py (one row).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_linear import shapes, variants  # noqa: E402

from qmamba.config import preset  # noqa: E402
from qmamba.kernels import decode_linear as dl  # noqa: E402
from qmamba.kernels.weights import PackedWeight  # noqa: E402
from qmamba.quant.formats import Int4Format  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="in_proj")
    ap.add_argument("--variants", default="bf16_bn4,planes_bn4,planes_magic_bn8,words_bn8")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    n, k, experts, opts = shapes(preset("blackmamba-2.8b"))[args.shape]
    lead = (experts,) if experts else ()
    fmt = Int4Format(128)
    int4 = fmt.kernel_weight({key: t.to(dev) for key, t in fmt.quantize_rtn(torch.randn(*lead, n, k)).items()}, n, k)
    forms = {"words": int4, "planes": int4.to_planes(),
             "float": PackedWeight.from_float(int4.dequantized(torch.bfloat16))}
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    kw = {"row_expert": torch.tensor([1], dtype=torch.int32, device=dev)} if experts else {}
    if opts.get("gated"):
        kw["gated"] = opts["gated"]
    table = variants(dl.pdl_supported(dev), 1)
    for v in args.variants.split(","):
        form, policy = table[v]
        before = set(dl._decode_linear_kernel.device_caches[0][0].keys()) if hasattr(
            dl._decode_linear_kernel, "device_caches") else set()
        out = torch.empty(1, n // 2 if opts.get("gated") else n, device=dev, dtype=torch.bfloat16)
        dl.decode_linear(x, forms[form], out, policy=policy, **kw)
        torch.cuda.synchronize()
        cache = dl._decode_linear_kernel.device_caches[0][0]
        new = [key for key in cache if key not in before] or list(cache)[-1:]
        compiled = cache[new[-1]]
        print(f"{args.shape} {v}: registers {compiled.n_regs}, spills {compiled.n_spills}, "
              f"shared {compiled.metadata.shared}", flush=True)
        for ext in ("ttgir", "ptx"):
            (out_dir / f"{args.shape}_{v}.{ext}").write_text(compiled.asm[ext])
        cubin = out_dir / f"{args.shape}_{v}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        try:
            sass = subprocess.run(["cuobjdump", "--dump-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            (out_dir / f"{args.shape}_{v}.sass").write_text(sass)
            print(f"  SASS instructions: {sum(1 for line in sass.splitlines() if line.strip().startswith('/*0'))}")
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"  no SASS: {exc}")
        cubin.unlink()


if __name__ == "__main__":
    main()
