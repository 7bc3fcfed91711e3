"""End-to-end BlackMamba-2.8B (preset, random weights built on the GPU) on the H100: decode ms/token with CUDA
graphs (fused step) for bf16 / int8 / int4 g128 / 1-bit (binary projections and experts, int4 g128 x_proj, dt_proj
and head) at batch 1 and 8, prefill tokens/s at 2048, peak GPU memory, and
the eager PyTorch reference path for contrast.

    python benchmarks/bench_e2e.py --out results/e2e.json [--preset blackmamba-2.8b]

Decode is timed as ``n`` back-to-back replays of the captured step on its static state (CUDA events, median of 5);
memory is ``torch.cuda.max_memory_allocated`` after building the model in its format (peak of inference only:
the float weights the RTN swap starts from are freed before the counter is reset).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from qmamba.config import preset
from qmamba.cuda_graph import GraphDecoder
from qmamba.testing import quantize_rtn, random_model
from qmamba.quant.binary import BinaryFormat
from qmamba.quant.formats import Int4Format, Int8Format

# name -> (format of the projections and experts, format of x_proj / dt_proj / head or None for the same)
FORMATS = {"bf16": (None, None), "int8": (Int8Format(), None), "int4_g128": (Int4Format(128), None),
           "binary+int4_g128": (BinaryFormat(), Int4Format(128))}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def time_decode(decoder, batch, n=100):
    state = decoder.new_state(batch)
    ids = torch.randint(0, decoder.model.config.vocab_size, (batch,), device="cuda")
    entry = decoder._entry(batch)
    entry.ids.copy_(ids)
    for _ in range(10):
        entry.graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            entry.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    del state
    return statistics.median(times)


def time_eager_step(model, batch, n=5):
    state = model.new_state(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch,), device="cuda")
    model.step(ids, state, check=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        model.step(ids, state, check=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def time_prefill(model, length=2048, batch=1, n=3):
    """Tokens/s of a prompt prefill as generation runs it (the head on the last position only)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda")
    model.prefill(ids, check=False, last_only=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.prefill(ids, check=False, last_only=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * length / statistics.median(times)


@torch.no_grad()
def run_format(cfg, name, fmts, log, eager: bool):
    model = random_model(cfg, "cuda", torch.bfloat16)
    fmt, sensitive = fmts
    if fmt is not None:
        quantize_rtn(model, fmt, head=True, sensitive_fmt=sensitive)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = dict(format=name, weight_bytes=weight_bytes(model))
    model.set_backend("triton")
    decoder = GraphDecoder(model)
    for batch in (1, 8):
        ms = time_decode(decoder, batch)
        res[f"decode_ms_b{batch}"] = ms
        log(f"{name:10s} graph decode batch {batch}: {ms:.3f} ms/token ({batch / ms * 1e3:.0f} tok/s)")
    res["prefill_tok_s_2048"] = time_prefill(model)
    log(f"{name:10s} prefill 2048 (triton backend): {res['prefill_tok_s_2048']:.0f} tok/s")
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    log(f"{name:10s} peak memory {res['peak_gb']:.2f} GB, weights {res['weight_bytes'] / 1e9:.2f} GB")
    try:
        unfused = GraphDecoder(model, fused=False)
        res["decode_ms_b1_graph_modelstep"] = time_decode(unfused, 1)
        log(f"{name:10s} graph of model.step (unfused, triton backend) batch 1: {res['decode_ms_b1_graph_modelstep']:.3f} ms")
        del unfused
    except Exception as exc:  # noqa: BLE001
        res["graph_modelstep_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if eager:
        for backend in ("triton", "reference"):
            model.set_backend(backend)
            for batch in (1, 8):
                res[f"eager_{backend}_ms_b{batch}"] = time_eager_step(model, batch)
                log(f"{name:10s} eager {backend} step batch {batch}: {res[f'eager_{backend}_ms_b{batch}']:.2f} ms/token")
        model.set_backend("reference")
        res["prefill_reference_tok_s_2048"] = time_prefill(model, n=1)
        log(f"{name:10s} prefill 2048 reference backend: {res['prefill_reference_tok_s_2048']:.0f} tok/s")
    del decoder, model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--eager", default="bf16,int4_g128", help="formats that also time the eager paths ('' for none)")
    args = ap.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    cfg = preset(args.preset)
    result = dict(preset=args.preset, device=torch.cuda.get_device_name(0), rows=[])
    for name in args.formats.split(","):
        try:
            result["rows"].append(run_format(cfg, name, FORMATS[name], log, eager=name in args.eager.split(",")))
        except Exception:  # noqa: BLE001
            result.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            log(traceback.format_exc())
            gc.collect()
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
