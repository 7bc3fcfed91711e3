"""``qmamba generate PATH --prompt TEXT``: stream generated text to the terminal, tokens/s to stderr.

``PATH`` is any checkpoint ``qmamba.load_model`` reads. An ``.onnx`` path (or ``--backend onnxruntime``) is handed
to ``qmamba.export.ort_runner.generate_cli(path, **options)`` with the same options as keywords (``prompt``,
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``tokenizer``, ``device``, ``dtype``).
"""

from __future__ import annotations

import importlib
import sys
import time

import click

from qmamba.errors import UserError

BACKEND_CHOICES = ("reference", "triton", "onnxruntime")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_onnx(path: str, options: dict) -> None:
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
    ort_runner.generate_cli(path, **options)


def generate_text(path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, tokenizer: str | None, device: str, dtype: str | None, backend: str | None,
                  out=None, err=None) -> dict:
    """Load, generate, and stream the text of one prompt to ``out``; returns timing figures (also printed to
    ``err``)."""
    import torch

    import qmamba
    from qmamba.generation import check_sampling_options, generate
    from qmamba.tokenizer import resolve_tokenizer

    out = out or sys.stdout
    err = err or sys.stderr
    check_sampling_options(temperature, top_k, top_p)
    tok = resolve_tokenizer(path, tokenizer, notice=lambda text: err.write(text + "\n"))  # fail before loading
    model = qmamba.load_model(path, device=device, dtype=dtype, backend=backend)
    ids = tok.encode(prompt)
    if not ids:
        if tok.eos_token_id is None:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [tok.eos_token_id]  # an empty prompt starts a new document
    input_ids = torch.tensor([ids], dtype=torch.int64, device=model.device)
    model.check_token_ids(input_ids)

    decoder = tok.stream_decoder()
    timing = {"first": None, "count": 0}
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
            out.write(piece)
            out.flush()

    start = time.perf_counter()
    from qmamba.cuda_graph import default_step_fn  # CUDA + triton backend: graph-captured fused decode

    generate(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             eos_token_id=tok.eos_token_id, stream=stream, step_fn=default_step_fn(model))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    end = time.perf_counter()
    out.write(decoder.flush() + "\n")
    out.flush()
    n = timing["count"]
    first = timing["first"] or end
    decode_s = end - first
    stats = {"prompt_tokens": len(ids), "new_tokens": n, "prefill_s": first - start, "decode_s": decode_s,
             "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")}
    err.write(f"{n} tokens in {end - start:.2f} s: prefill {len(ids)} tokens + first token "
              f"{stats['prefill_s'] * 1e3:.0f} ms, decode {stats['tokens_per_s']:.1f} tokens/s\n")
    return stats


@click.command("generate")
@click.argument("path")
@click.option("--prompt", default="", show_default=False, help="Text to continue (empty: start a new document).")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", "-t", default=0.8, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=0.95, show_default=True, type=float, help="1 = off.")
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the checkpoint's; for the "
              "GPT-NeoX vocabulary of BlackMamba/Mamba without one, the NeoX tokenizer shipped with qmamba).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA).")
@click.option("--backend", default=None, type=click.Choice(BACKEND_CHOICES),
              help="Sequence ops (default: triton on CUDA when available); onnxruntime for exported models.")
def generate(path, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, device, dtype, backend):
    """Generate text from the checkpoint at PATH, streaming it to the terminal."""
    device = device or _default_device()
    if backend == "onnxruntime" or str(path).endswith(".onnx"):
        run_onnx(path, dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, tokenizer=tokenizer, device=device, dtype=dtype))
        return
    generate_text(path, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed, tokenizer=tokenizer, device=device, dtype=dtype, backend=backend)
