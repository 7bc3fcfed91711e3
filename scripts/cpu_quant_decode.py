"""CPU decode ms/token of a quantized model on the PyTorch reference path, before and after the dense cache and with
torch's CPU int4 matmul (what ``qmamba generate`` runs on CPU), against the float model and the ONNX Runtime export
of the same int4 model (batch 1, ``--threads`` threads).

    python scripts/cpu_quant_decode.py [--model qmamba/assets/tiny-blackmamba|PRESET] [--threads 2] [--steps 64]
           [--rounds 5] [--variants fp32,int4-per-call,int4-dense-cache,int4-cpu-int4,onnx-int4]

``int4-cpu-int4``: ``keep_dense_weights(model, float32, cpu_int4=True)``, as ``load_model(cpu_int4=True)`` does:
int4 linears run ``aten._weight_int4pack_mm_for_cpu`` (activations in bfloat16), experts the dense cache.

The int4 model is the round-to-nearest one of benchmarks/bench_onnx_cpu.py (in_proj, out_proj, experts and the head;
group size 64) and the timing its ``time_decode`` (median ms of single-token steps after warm-up). The variants are
measured in turn, ``--rounds`` times, so a shared machine's load spreads over all of them; the median and the best
round are printed, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_onnx_cpu as bench  # noqa: E402

from qmamba.checkpoints.load import build_model  # noqa: E402
from qmamba.quant.modules import cpu_int4_module_names, keep_dense_weights  # noqa: E402

VARIANTS = ("fp32", "int4-per-call", "int4-dense-cache", "int4-cpu-int4", "onnx-int4")


def make_steppers(cfg, sd, manifest, variants, threads):
    """``{variant: (step(token, state), prefill(ids) -> state, note)}``."""
    qsd, qman = bench.rtn_quantize(cfg, sd, "int4")
    out = {}
    for name in variants:
        if name == "onnx-int4":
            from qmamba.export.exporter import export_model
            from qmamba.export.graph import ExportOptions
            from qmamba.export.ort_runner import OrtLM

            path = Path(tempfile.mkdtemp(prefix="qmamba-cpu-")) / "int4.onnx"
            export_model(cfg, qsd, qman, path, ExportOptions(), overwrite=True)
            lm = OrtLM(path, threads=threads)
            out[name] = (lambda t, s, lm=lm: lm.step(t, s), lambda ids, lm=lm: lm.prefill(ids)[1], "")
            continue
        model = build_model(cfg, dict(sd if name == "fp32" else qsd), manifest if name == "fp32" else qman, "cpu",
                            torch.float32)
        note = ""
        if name == "int4-dense-cache":
            note = f" (dense cache {keep_dense_weights(model, torch.float32) / 2**20:.1f} MiB)"
        elif name == "int4-cpu-int4":
            kept = keep_dense_weights(model, torch.float32, cpu_int4=True)
            note = f" ({len(cpu_int4_module_names(model))} int4 matmuls; kept operands {kept / 2**20:.1f} MiB)"
        out[name] = (lambda t, s, m=model: m.step(t, s, check=False), lambda ids, m=model: m.prefill(ids)[1], note)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "qmamba" / "assets" / "tiny-blackmamba"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    cfg, sd, manifest, label = bench.load_checkpoint(args.model)
    steppers = make_steppers(cfg, sd, manifest, variants, args.threads)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (step, prefill, _) in steppers.items():
                times[name].append(bench.time_decode(step, prefill(ids), args.steps, cfg.vocab_size))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{label}: batch 1, {args.threads} threads, median of {args.steps} steps, {args.rounds} rounds; "
          f"torch {torch.__version__}; load average {load}")
    for name, values in times.items():
        print(f"  {name:17s} {statistics.median(values):9.2f} ms/token (best round {min(values):.2f})"
              f"{steppers[name][2]}")


if __name__ == "__main__":
    main()
