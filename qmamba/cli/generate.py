"""``qmamba generate PATH --prompt TEXT``: stream generated text to the terminal, tokens/s to stderr.

``PATH`` is any checkpoint ``qmamba.load_model`` reads. An ``.onnx`` path (or ``--backend onnxruntime``) is handed
to ``qmamba.export.ort_runner.generate_cli(path, **options)`` with the same options as keywords (``prompt``,
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``tokenizer``, ``device``, ``dtype``, ``out``),
which returns the same figures as :func:`generate_text`. Ctrl-C ends the streamed line before "interrupted".
"""

from __future__ import annotations

import importlib
import sys
import time

import click

from qmamba.cli.param_types import DEVICE_HELP, DTYPE_CHOICES
from qmamba.errors import UserError

BACKEND_CHOICES = ("reference", "triton", "onnxruntime")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_onnx(path: str, options: dict) -> dict:
    """Delegate to the ONNX Runtime runner (written by the export module)."""
    try:
        ort_runner = importlib.import_module("qmamba.export.ort_runner")
    except ModuleNotFoundError as exc:
        if exc.name in ("onnxruntime", "onnx"):
            raise UserError(f"ONNX Runtime generation needs {exc.name}: pip install 'qmamba[export]'") from None
        if exc.name in ("qmamba.export", "qmamba.export.ort_runner"):
            raise UserError("ONNX Runtime generation is not available in this build (no qmamba.export.ort_runner); "
                            "use --backend reference|triton with a torch checkpoint") from None
        raise
    if not hasattr(ort_runner, "generate_cli"):
        raise UserError("this qmamba build has no ONNX Runtime generation entry point (ort_runner.generate_cli)")
    return ort_runner.generate_cli(path, **options)


def generate_text(path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, tokenizer: str | None, device: str, dtype: str | None, backend: str | None,
                  out=None, err=None) -> dict:
    """Load, generate, and stream the text of one prompt to ``out``; returns timing figures and the generated text
    (the timing line also goes to ``err``)."""
    import torch

    import qmamba
    from qmamba.generation import check_sampling_options, generate, timing_line, timing_stats
    from qmamba.tokenizer import find_tokenizer_file, load_tokenizer

    out = out or sys.stdout
    err = err or sys.stderr
    check_sampling_options(temperature, top_k, top_p)
    tok = load_tokenizer(find_tokenizer_file(None, tokenizer)) if tokenizer else None  # fail before loading
    model = qmamba.load_model(path, device=device, dtype=dtype, backend=backend)
    if tok is None:
        tok = load_tokenizer(find_tokenizer_file(getattr(model, "tokenizer_path", None) or path))
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary is "
                        f"{model.config.vocab_size}: wrong tokenizer?")
    ids = tok.encode(prompt)
    if not ids:
        if tok.eos_token_id is None:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [tok.eos_token_id]  # an empty prompt starts a new document
    input_ids = torch.tensor([ids], dtype=torch.int64, device=model.device)
    model.check_token_ids(input_ids)

    decoder = tok.stream_decoder()
    timing = {"first": None, "count": 0}
    pieces = []
    out.write(prompt)
    out.flush()

    def stream(token):
        token_id = int(token[0])
        if timing["first"] is None:
            timing["first"] = time.perf_counter()
        timing["count"] += 1
        if token_id == tok.eos_token_id:
            return
        piece = decoder.push([token_id])
        if piece:
            pieces.append(piece)
            out.write(piece)
            out.flush()

    start = time.perf_counter()
    from qmamba.cuda_graph import default_step_fn  # CUDA + triton backend: graph-captured fused decode

    generate(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             eos_token_id=tok.eos_token_id, stream=stream, step_fn=default_step_fn(model))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    end = time.perf_counter()
    pieces.append(decoder.flush())
    out.write(pieces[-1] + "\n")
    out.flush()
    stats = {**timing_stats(len(ids), timing["count"], start, timing["first"], end), "text": "".join(pieces)}
    err.write(timing_line(stats) + "\n")
    return stats


class LineTracker:
    """A text stream wrapper that knows whether the cursor is at the start of a line (for Ctrl-C messages)."""

    def __init__(self, stream):
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@click.command("generate")
@click.argument("path")
@click.option("--prompt", default="", show_default=False, help="Text to continue (empty: start a new document).")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(min=0),
              help="Tokens to generate (fewer when the model ends the text).")
@click.option("--temperature", "-t", default=0.8, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature; 0 = greedy.")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0),
              help="Sample among the k most likely tokens; 0 = off.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling mass in (0, 1]; 1 = off.")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Seed for reproducible sampling.")
@click.option("--tokenizer", default=None, help="tokenizer.json (default: the one in the checkpoint directory).")
@click.option("--device", default=None, help=f"Device [default: cuda when available, else cpu]: {DEVICE_HELP}.")
@click.option("--dtype", default=None, type=click.Choice(DTYPE_CHOICES),
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--backend", default=None, type=click.Choice(BACKEND_CHOICES),
              help="Sequence ops [default: triton on CUDA, reference on CPU]; onnxruntime for exported models.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the generated text and timings as JSON to this file.")
def generate(path, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, device, dtype, backend,
             json_out):
    """Generate text from the checkpoint at PATH, streaming it to the terminal."""
    from qmamba.devices import parse_device
    from qmamba.output_files import check_output_file, write_json_file

    if json_out:
        check_output_file(json_out)
    out = LineTracker(sys.stdout)
    options = dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, tokenizer=tokenizer, dtype=dtype)
    try:
        if backend == "onnxruntime" or str(path).endswith(".onnx"):
            if device is not None:
                parse_device(device)  # onnxruntime itself falls back to CPU (with a warning) when CUDA is missing
            stats = run_onnx(path, dict(options, device=device or _default_device(), out=out))
        else:
            stats = generate_text(path, **options, device=device or _default_device(), backend=backend, out=out)
    except KeyboardInterrupt:
        if not out.at_line_start:
            out.write("\n")  # "interrupted" (stderr) starts on its own line
            out.flush()
        raise
    if json_out:
        write_json_file(json_out, {"path": str(path), **options, "device": device, "backend": backend, **stats})
