"""CPU benchmark of the ONNX export: decode ms/token and prefill tokens/s of exported models (onnxruntime CPU EP)
against the PyTorch CPU reference path, plus file sizes. Writes a Markdown table (default benchmarks/onnx_cpu.md).

    python benchmarks/bench_onnx_cpu.py [--threads 2] [--prompt 256] [--steps 64] [--model PATH|PRESET ...]

Models: the trained fixture (qmamba/assets/tiny-blackmamba) when present, else the random-weight preset of the
same shapes (``tiny-blackmamba-fixture``: timings do not depend on trained values, only routing balance may), and
any ``--model`` given (a checkpoint path or a preset name, random weights). Quantized variants are made here by
round-to-nearest through :mod:`qmamba.quant` (in_proj, out_proj, experts and the head; group size 64 for int4):
speed does not depend on the rounding method.

Variants: PyTorch reference path (fp32 float model; int4 model = QuantLinear reference, which dequantizes each
call), ONNX fp32 (LinearAttention body and Scan body), ONNX int4 and int8 (MatMulNBits, accuracy_level 4).
Decode: batch 1, median ms of ``--steps`` single-token steps after warm-up. Prefill: batch 1, one prompt of
``--prompt`` tokens, best of 3 runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "qmamba" / "assets" / "tiny-blackmamba"


def load_checkpoint(spec: str):
    from qmamba.checkpoints.detect import read_checkpoint
    from qmamba.checkpoints.random_init import random_state_dict
    from qmamba.config import PRESETS, preset

    if spec in PRESETS:
        cfg = preset(spec)
        return cfg, random_state_dict(cfg, seed=0), {}, f"{spec} (random weights)"
    cfg, sd, manifest = read_checkpoint(spec, hash_files=False)
    return cfg, sd, manifest, str(Path(spec).relative_to(REPO) if Path(spec).is_relative_to(REPO) else spec)


def rtn_quantize(cfg, state_dict, kind: str):
    """``(state_dict, manifest)`` of a round-to-nearest quantized copy (see module doc)."""
    from qmamba.checkpoints.load import build_model
    from qmamba.quant.formats import Int4Format, Int8Format
    from qmamba.quant.modules import QuantExperts, QuantLinear

    model = build_model(cfg, dict(state_dict), {}, "cpu", torch.float32)
    fmt = Int8Format() if kind == "int8" else Int4Format(group_size=64)
    entries = {}
    for block in model.blocks:
        mixer, i = block.mixer, block.index
        if block.is_mamba:
            for leaf in ("in_proj", "out_proj"):
                setattr(mixer, leaf, QuantLinear.from_linear(getattr(mixer, leaf), fmt))
                entries[f"layers.{i}.mixer.{leaf}"] = fmt.to_dict()
        else:
            mixer.experts = QuantExperts.from_stacked(mixer.experts, fmt, fmt)
            entries.update({f"layers.{i}.mixer.experts.{w}": fmt.to_dict() for w in ("fc1", "fc2")})
    model.lm_head = QuantLinear.from_linear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), fmt,
                                            fmt.quantize_rtn(model.lm_head.weight.detach()))
    entries["lm_head"] = fmt.to_dict()
    return {k: v.clone() for k, v in model.state_dict().items()}, {"quantization": entries}


def time_prefill(prefill, ids, runs: int = 3) -> float:
    """Tokens/s of the best of ``runs`` prefills."""
    prefill(ids[:, :8])  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        prefill(ids)
        best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def time_decode(step, state, steps: int, vocab: int) -> float:
    """Median ms per single-token step."""
    tokens = torch.randint(0, vocab, (steps + 8, 1), generator=torch.Generator().manual_seed(0))
    times = []
    for i, token in enumerate(tokens):
        start = time.perf_counter()
        step(token, state)
        if i >= 8:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_torch(cfg, sd, manifest, ids, steps):
    from qmamba.checkpoints.load import build_model

    model = build_model(cfg, dict(sd), manifest, "cpu", torch.float32)
    with torch.inference_mode():
        tps = time_prefill(lambda x: model.prefill(x), ids)
        _, state = model.prefill(ids[:, :16])
        ms = time_decode(lambda t, s: model.step(t, s, check=False), state, steps, cfg.vocab_size)
    return tps, ms


def bench_onnx(path, threads, ids, steps, vocab):
    from qmamba.export.ort_runner import OrtLM

    lm = OrtLM(path, threads=threads)
    tps = time_prefill(lambda x: lm.prefill(x, last_only=True), ids)
    _, state = lm.prefill(ids[:, :16])
    ms = time_decode(lambda t, s: lm.step(t, s), state, steps, vocab)
    return tps, ms


def checkpoint_bytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def run(models, threads: int, prompt: int, steps: int) -> str:
    import onnxruntime

    from qmamba.export.exporter import export_model
    from qmamba.export.graph import ExportOptions

    torch.set_num_threads(threads)
    lines = [
        "# ONNX export on CPU: onnxruntime vs the PyTorch reference path",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {threads} threads (torch.set_num_threads, ORT "
        f"intra_op_num_threads); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"Batch 1; prefill = one {prompt}-token prompt (best of 3); decode = median of {steps} steps.",
        "Made by `python benchmarks/bench_onnx_cpu.py` (see its docstring for the variants).",
        "",
        "| model | variant | prefill tok/s | decode ms/token | size MiB |",
        "|---|---|---:|---:|---:|",
    ]
    tmp = Path(tempfile.mkdtemp(prefix="qmamba-bench-"))
    for spec in models:
        cfg, sd, manifest, label = load_checkpoint(spec)
        ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
        variants = {"float": (sd, manifest)}
        for kind in ("int4", "int8"):
            variants[kind] = rtn_quantize(cfg, sd, kind)
        rows = []
        for kind in ("float", "int4"):
            vsd, vman = variants[kind]
            tps, ms = bench_torch(cfg, vsd, vman, ids, steps)
            rows.append((f"PyTorch reference, {'fp32' if kind == 'float' else 'int4 (dequant per call)'}", tps, ms,
                         checkpoint_bytes(vsd)))
        onnx_variants = [("ONNX fp32, LinearAttention", "float", ExportOptions()),
                         ("ONNX fp32, Scan body", "float", ExportOptions(scan="scan")),
                         ("ONNX int4 (MatMulNBits, acc 4)", "int4", ExportOptions()),
                         ("ONNX int8 (MatMulNBits, acc 4)", "int8", ExportOptions())]
        for name, kind, options in onnx_variants:
            vsd, vman = variants[kind]
            out = tmp / f"{cfg.d_model}-{name.split(',')[0].replace(' ', '_')}-{kind}-{options.scan}.onnx"
            summary = export_model(cfg, vsd, vman, out, options, overwrite=True)
            tps, ms = bench_onnx(out, threads, ids, steps, cfg.vocab_size)
            rows.append((name, tps, ms, summary.file_bytes))
        for name, tps, ms, size in rows:
            lines.append(f"| {label} | {name} | {tps:,.0f} | {ms:.2f} | {size / 2**20:.2f} |")
        print("\n".join(lines[-len(rows):]), flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Load average at the end of the run: {load} (the machine is shared: figures are indicative).",
              "Sizes: PyTorch rows = tensor bytes of the (quantized) state dict; ONNX rows = .onnx (+ .data) file.",
              "The ONNX int4/int8 rows use int8 activations (accuracy_level 4); accuracy_level 0 is exact but slower",
              "(perplexity and decode speed of both levels: benchmarks/onnx_accuracy_level.md)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--model", action="append", default=None,
                        help="checkpoint path or preset name (repeatable); default: the fixture")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "onnx_cpu.md"))
    args = parser.parse_args()
    models = args.model or [str(FIXTURE) if (FIXTURE / "manifest.json").is_file() else "tiny-blackmamba-fixture"]
    table = run(models, args.threads, args.prompt, args.steps)
    Path(args.out).write_text(table, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
