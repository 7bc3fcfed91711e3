"""Reproduce the 1-bit table of docs/binary.md on a float checkpoint (default: the trained fixture).

    python scripts/binary_table.py [--model qmamba/assets/tiny-blackmamba] [--out /tmp/binary_table]
           [--distill-steps 300] [--eval-tokens 16384] [--threads 2] [--only "1-bit PTB,1-bit distilled"]

Rows: fp32, int4 g128 GPTQ, 1-bit PTB (plain and row-scale), 1-bit distilled (alpha/beta + norms, signs by STE).
Each quantized row is made by the same library call as ``qmamba quantize`` (calibration/distillation text: seeded
windows of the TRAIN split). Columns: bytes on disk of the quantized module tensors ("body": in_proj, out_proj,
experts as stored) and of the whole checkpoint directory, held-out perplexity (``corpus:heldout``, windows of 256
tokens), CPU decode speed (batch 1, tokens/s: PyTorch ``model.step`` on the reference backend, and ONNX Runtime
at accuracy_level 4 when onnxruntime is installed). Prints a Markdown table and writes it plus JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROWS = {  # label: QuantizeOptions fields (distill and row_scale handled below)
    "fp32": None,
    "int4 g128 GPTQ": dict(bits=4, group_size=128, method="gptq"),
    "1-bit PTB": dict(bits=1),
    "1-bit PTB row-scale": dict(bits=1, row_scale=True),
    "1-bit distilled": dict(bits=1, distill=True),
}


def body_bytes(path: Path) -> int:
    """Bytes of the tensors of in_proj/out_proj/experts (quantized or float) in the checkpoint's safetensors."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if any(part in key for part in (".in_proj.", ".out_proj.", ".experts.")):
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@torch.no_grad()
def decode_speed(model, n_tokens: int = 64) -> float:
    state = model.new_state(1)
    token = torch.zeros(1, dtype=torch.long)
    for _ in range(4):
        model.step(token, state)
    start = time.perf_counter()
    for _ in range(n_tokens):
        token = model.step(token, state).argmax(-1)
    return n_tokens / (time.perf_counter() - start)


def ort_decode_speed(path: Path, out: Path, n_tokens: int = 64) -> float | None:
    try:
        from qmamba.export.exporter import export_checkpoint
        from qmamba.export.graph import ExportOptions
        from qmamba.export.ort_runner import OrtLM
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_checkpoint(path, out / "model.onnx", ExportOptions(accuracy_level=4), overwrite=True).path
    lm = OrtLM(onnx_path)
    _, state = lm.prefill(torch.zeros(1, 2, dtype=torch.long))
    token = torch.zeros(1, dtype=torch.long)
    for _ in range(4):
        lm.step(token, state)
    start = time.perf_counter()
    for _ in range(n_tokens):
        token = lm.step(token, state).argmax(-1)
    return n_tokens / (time.perf_counter() - start)


def main():
    from qmamba import load_model
    from qmamba.calib.distill import DistillOptions
    from qmamba.calib.pipeline import CalibOptions
    from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
    from qmamba.data_files import resolve_text_spec
    from qmamba.eval import encode_text_spec, perplexity
    from qmamba.tokenizer import resolve_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "qmamba/assets/tiny-blackmamba"))
    ap.add_argument("--out", default="/tmp/binary_table")
    ap.add_argument("--nsamples", type=int, default=256, help="calibration / distillation sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib", default="full", help="calibration text: full (the full train split, as for the "
                    "committed tables; needs $QMAMBA_DATA_DIR or ../shared/data), corpus (the slice shipped) or a file")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens, spread over the held-out files")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated row labels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.model)
    tok = resolve_tokenizer(src)
    files = resolve_text_spec("corpus:heldout")
    ids = torch.cat([encode_text_spec(tok, f"corpus:heldout/{p.name.split('.')[0]}", args.eval_tokens // len(files))
                     for p in files])
    labels = args.only.split(",") if args.only else list(ROWS)
    rows = []
    for label in labels:
        spec = ROWS[label]
        path, info = src, {}
        if spec is not None:
            path = out / label.replace(" ", "_")
            kwargs = dict(spec)
            distill = DistillOptions(steps=args.distill_steps, lr=args.distill_lr, ste=True, train_norms=True,
                                     progress=True) if kwargs.pop("distill", False) else None
            row_scale = kwargs.pop("row_scale", False)
            start = time.perf_counter()
            if row_scale:  # the variant has no CLI flag: PTB straight from the float weights
                info = _quantize_row_scale(src, path, args)
            else:
                options = QuantizeOptions(calib=[args.calib], nsamples=args.nsamples, seq_len=args.seq_len,
                                          overwrite=True, distill=distill, calibration=CalibOptions(progress=False),
                                          **kwargs)
                info = quantize_checkpoint(src, path, options, log=lambda *_: None)
            info = {"seconds": round(time.perf_counter() - start, 1),
                    "distillation": {k: v for k, v in (info.get("distillation") or {}).items() if k != "history"}}
        model = load_model(path)
        ppl = perplexity(model, ids, 256, 256, batch_size=16, progress=False)["ppl"]
        row = {"format": label, "body_bytes": body_bytes(path), "total_bytes": dir_bytes(path), "ppl": ppl,
               "decode_tok_s_torch": decode_speed(model), "decode_tok_s_ort": ort_decode_speed(path, out / "onnx"),
               **info}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| format | body bytes | total bytes | held-out ppl | decode tok/s (PyTorch ref) | decode tok/s (ORT) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ort = f"{r['decode_tok_s_ort']:.0f}" if r["decode_tok_s_ort"] else "-"
        lines.append(f"| {r['format']} | {r['body_bytes']:,} | {r['total_bytes']:,} | {r['ppl']:.2f} | "
                     f"{r['decode_tok_s_torch']:.0f} | {ort} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2))


def _quantize_row_scale(src: Path, path: Path, args) -> dict:
    """PTB with the per-output-row scale variant (``BinaryFormat(row_scale=True)``): data-free, so done directly on
    the float weights (the same modules ``--bits 1`` selects), saved as a native checkpoint."""
    from qmamba.calib.pipeline import ModuleResult
    from qmamba.calib.quantize import source_record
    from qmamba.calib.recipe import build_plan
    from qmamba.checkpoints.load import build_model
    from qmamba.checkpoints.detect import read_checkpoint
    from qmamba.checkpoints.native import save_checkpoint
    from qmamba.quant.binary import BinaryFormat
    from qmamba.quant.modules import swap_quantized_modules

    cfg, sd, manifest = read_checkpoint(src)
    dtype = next(t.dtype for t in sd.values() if t.is_floating_point())
    model = build_model(cfg, sd, {}, "cpu", torch.float32)
    fmt = BinaryFormat(row_scale=True)
    results = {}
    for name in build_plan(model, bits=1):
        parent, _, leaf = name.rpartition(".")
        W = getattr(model.get_submodule(parent), leaf) if leaf in ("fc1", "fc2") else model.get_submodule(name).weight
        results[name] = ModuleResult(name, leaf, fmt, "ptb", fmt.quantize_rtn(W.detach()), W.numel())
    swap_quantized_modules(model, {n: r.fmt for n, r in results.items()}, {n: r.packed for n, r in results.items()})
    save_checkpoint(model.state_dict(), cfg, path, source=source_record(src, manifest), dtype=dtype,
                    quantization={n: r.manifest_entry() for n, r in results.items()},
                    tokenizer_file=src / "tokenizer.json", overwrite=True)
    return {}


if __name__ == "__main__":
    main()
