"""What MatMulNBits' ``accuracy_level`` costs an int4 ONNX export on CPU: held-out perplexity, agreement of the
next-token argmax and the logits with the PyTorch int4 model, decode ms/token and prefill tokens/s, per level.

    python benchmarks/bench_onnx_accuracy_level.py --int4 DIR [--float DIR] [--levels 0 4] [--tokens 12288]
        [--seq-len 256] [--steps 48] [--rounds 3] [--threads 2] [--out FILE.md]

``--int4``: a quantized qmamba checkpoint (e.g. ``qmamba quantize qmamba/assets/tiny-blackmamba DIR``, the CLI
defaults: int4 g128 GPTQ); each level's export is made here (``qmamba export DIR OUT.onnx --accuracy-level L``'s
code path) into a temporary folder. ``--float``: its float source, for a perplexity row of reference.

Perplexity: :func:`qmamba.eval.perplexity` (non-overlapping windows of ``--seq-len``) on the same tokens for every
model: an equal slice of each ``corpus:heldout`` file (``--tokens`` in all). The ONNX models run through
:class:`qmamba.export.ort_runner.OrtLM` (CPU execution provider). Agreement: the fraction of scored positions whose
argmax equals the PyTorch int4 model's, and the mean over positions of ``max|logits - ref| / max|ref|``.
Speed: batch 1; decode = median ms of ``--steps`` single-token steps after warm-up, prefill = one 256-token
prompt, best of 3 (as benchmarks/bench_onnx_cpu.py); the variants are timed in turn in each of ``--rounds``
rounds and the median of the rounds is reported (the machine may be shared: interleaving spreads the load).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_onnx_cpu import time_decode, time_prefill  # noqa: E402


class OrtAsModel:
    """What :func:`qmamba.eval.perplexity` calls: ``model(ids [B, L]) -> logits``, ``model.device``."""

    def __init__(self, lm):
        self.lm = lm
        self.device = torch.device("cpu")

    def __call__(self, ids):
        return self.lm.prefill(ids)[0]


def heldout_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    from qmamba.data_files import resolve_text_spec
    from qmamba.eval import encode_text_spec

    files = resolve_text_spec("corpus:heldout")
    return torch.cat([encode_text_spec(tokenizer, f"corpus:heldout/{p.name.split('.')[0]}", n_tokens // len(files))
                      for p in files])


@torch.no_grad()
def scored_logits(model, ids: torch.Tensor, seq_len: int, batch: int = 8) -> torch.Tensor:
    """Logits ``[n_windows, seq_len, V]`` of the non-overlapping windows (the agreement measure)."""
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].reshape(n, seq_len)
    return torch.cat([model(w).float() for w in windows.split(batch)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--int4", required=True, help="quantized qmamba checkpoint directory")
    parser.add_argument("--float", dest="float_path", default=None, help="its float checkpoint (reference row)")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed columns (e.g. a random-weight model, where perplexity means nothing)")
    args = parser.parse_args()

    import onnxruntime

    from qmamba import load_model
    from qmamba.eval import perplexity
    from qmamba.export.exporter import export_checkpoint
    from qmamba.export.graph import ExportOptions
    from qmamba.export.ort_runner import OrtLM
    from qmamba.tokenizer import resolve_tokenizer

    torch.set_num_threads(args.threads)
    int4 = Path(args.int4)
    ids = None if args.speed_only else heldout_ids(resolve_tokenizer(int4), args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="qmamba-acc-level-"))

    torch_int4 = load_model(int4)  # CPU reference backend, float32, dense weight cache
    variants = {"PyTorch int4 (reference path, fp32)": torch_int4}
    sizes = {}
    for level in args.levels:
        summary = export_checkpoint(int4, tmp / f"l{level}.onnx", ExportOptions(accuracy_level=level))
        variants[f"ONNX int4, accuracy_level {level}"] = OrtAsModel(OrtLM(summary.path, threads=args.threads))
        sizes[f"ONNX int4, accuracy_level {level}"] = summary.file_bytes

    rows = {}  # the float row first when there is one
    if args.float_path and not args.speed_only:
        fp = load_model(args.float_path)
        rows["PyTorch float (source)"] = {"ppl": perplexity(fp, ids, args.seq_len, batch_size=8, progress=False)}
        del fp
    rows.update({name: {} for name in variants})
    ref_logits = None if args.speed_only else scored_logits(torch_int4, ids, args.seq_len)
    for name, model in ({} if args.speed_only else variants).items():
        t0 = time.perf_counter()
        res = perplexity(model, ids, args.seq_len, batch_size=8, progress=False)
        row = {"ppl": res, "eval_s": time.perf_counter() - t0}
        if not name.startswith("PyTorch"):
            logits = scored_logits(model, ids, args.seq_len)
            row["top1"] = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
            err = (logits - ref_logits).abs().amax(-1) / ref_logits.abs().amax(-1)
            row["rel_err"] = float(err.mean())
        rows[name] = row
        print(name, {k: (v["ppl"] if k == "ppl" else v) for k, v in row.items()}, flush=True)

    # speed, interleaved over rounds
    prompt = torch.randint(0, torch_int4.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
    speed: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, model in variants.items():
            if name.startswith("PyTorch"):
                with torch.inference_mode():
                    tps = time_prefill(lambda x: model.prefill(x, last_only=True), prompt)
                    _, state = model.prefill(prompt[:, :16])
                    ms = time_decode(lambda t, s: model.step(t, s, check=False), state, args.steps,
                                     torch_int4.config.vocab_size)
            else:
                lm = model.lm
                tps = time_prefill(lambda x: lm.prefill(x, last_only=True), prompt)
                _, state = lm.prefill(prompt[:, :16])
                ms = time_decode(lambda t, s: lm.step(t, s), state, args.steps, torch_int4.config.vocab_size)
            speed[name].append((ms, tps))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    what = "speed only" if args.speed_only else (
        f"perplexity: {rows[next(iter(variants))]['ppl']['tokens']} held-out tokens ({args.tokens // 3} of each "
        f"corpus:heldout file), windows of {args.seq_len}")
    lines = [
        f"{int4}; machine: {platform.processor() or platform.machine()}, {args.threads} threads (torch "
        f"set_num_threads, ORT intra_op_num_threads), {os.cpu_count()} CPUs visible; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; load average at the end {load}.",
        f"{what[0].upper() + what[1:]}. Speed: batch 1, decode median of {args.steps} steps, prefill 256 tokens "
        f"best of 3, median of {args.rounds} interleaved rounds.",
        "",
        "| model | held-out ppl | vs PyTorch int4 | argmax = PyTorch int4 | mean rel. max logit error "
        "| decode ms/token | prefill tok/s | size MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows["PyTorch int4 (reference path, fp32)"]["ppl"]["ppl"] if not args.speed_only else None

    def cell(value, fmt, suffix=""):
        return "" if value is None else format(value, fmt) + suffix

    for name, row in rows.items():
        ppl = row["ppl"]["ppl"] if "ppl" in row else None
        rel = 100 * (ppl / base - 1) if ppl is not None and base is not None else None
        ms = statistics.median(s[0] for s in speed[name]) if name in speed else None
        tps = statistics.median(s[1] for s in speed[name]) if name in speed else None
        top1 = 100 * row["top1"] if "top1" in row else None
        err = 100 * row["rel_err"] if "rel_err" in row else None
        size = sizes[name] / 2**20 if name in sizes else None
        lines.append(f"| {name} | {cell(ppl, '.4f')} | {cell(rel, '+.3f', '%')} | {cell(top1, '.2f', '%')} | "
                     f"{cell(err, '.3f', '%')} | {cell(ms, '.2f')} | {cell(tps, ',.0f')} | {cell(size, '.2f')} |")
    lines += ["", "Each round (decode ms/token, prefill tok/s): " + "; ".join(
        f"{name}: " + ", ".join(f"{ms:.2f} / {tps:,.0f}" for ms, tps in runs) for name, runs in speed.items()) + "."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
