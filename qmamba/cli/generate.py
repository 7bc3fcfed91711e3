"""``qmamba generate PATH --prompt TEXT``: stream generated text to the terminal, tokens/s to stderr.

``PATH`` is any checkpoint ``qmamba.load_model`` reads. An ``.onnx`` path (or ``--backend onnxruntime``) is handed
to ``qmamba.export.ort_runner.generate_cli(path, **options)`` with the same options as keywords (``prompt``,
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``tokenizer``, ``device``, ``dtype``). Both
backends stream through :func:`qmamba.generation.stream_generate`.
"""

from __future__ import annotations

import sys

import click

BACKEND_CHOICES = ("reference", "triton", "onnxruntime")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_onnx(path: str, options: dict) -> None:
    """Delegate to the ONNX Runtime runner of :mod:`qmamba.export.ort_runner`."""
    from qmamba.export.ort_runner import generate_cli

    generate_cli(path, **options)


def generate_text(path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, tokenizer: str | None, device: str, dtype: str | None, backend: str | None,
                  out=None, err=None) -> dict:
    """Load, generate, and stream the text of one prompt to ``out``; returns timing figures (also printed to
    ``err``)."""
    import qmamba
    from qmamba.cuda_graph import default_step_fn  # CUDA + triton backend: graph-captured fused decode
    from qmamba.generation import check_sampling_options, stream_generate
    from qmamba.tokenizer import resolve_tokenizer

    check_sampling_options(temperature, top_k, top_p)
    tok = resolve_tokenizer(path, tokenizer, notice=lambda text: (err or sys.stderr).write(text + "\n"))  # fail early
    model = qmamba.load_model(path, device=device, dtype=dtype, backend=backend)
    return stream_generate(model, tok, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, step_fn=default_step_fn(model), out=out, err=err)


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
