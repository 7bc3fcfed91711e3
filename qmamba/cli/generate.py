"""``qmamba generate PATH --prompt TEXT``: stream generated text to the terminal, tokens/s to stderr.

``PATH`` is any checkpoint ``qmamba.load_model`` reads. An ``.onnx`` path (or ``--backend onnxruntime``) is handed
to ``qmamba.export.ort_runner.generate_cli(path, **options)`` with the same options as keywords (``prompt``,
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``tokenizer``, ``device``, ``dtype``, ``out``),
which returns the same figures as :func:`generate_text`. Both backends stream through
:func:`qmamba.generation.stream_generate`. Ctrl-C ends the streamed line before "interrupted". On CPU the int4
linears of a quantized checkpoint run torch's CPU int4 matmul (``load_model(cpu_int4=True)``).
"""

from __future__ import annotations

import sys

import click

from qmamba.cli.param_types import (DEVICE_HELP, DTYPE_CHOICES, INT8_ACTIVATIONS_HELP, SEED, TOKENIZER_HELP,
                                   check_int8_activations)
from qmamba.errors import UserError

BACKEND_CHOICES = ("reference", "triton", "onnxruntime")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_onnx_device() -> str:
    """cuda when this machine has a GPU that both torch and onnxruntime (onnxruntime-gpu) can use, else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        import onnxruntime
    except ImportError:
        return "cpu"  # the runner says what to install
    return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


def run_onnx(path: str, options: dict) -> dict:
    """Delegate to the ONNX Runtime runner of :mod:`qmamba.export.ort_runner`; returns its figures."""
    from qmamba.export.ort_runner import generate_cli

    return generate_cli(path, **options)


def generate_text(path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, tokenizer: str | None, device: str, dtype: str | None, backend: str | None,
                  out=None, err=None, int8_activations: bool | None = None) -> dict:
    """Load, generate, and stream the text of one prompt to ``out``; returns timing figures, the generated text and
    the device, dtype and backend that ran (the timing line also goes to ``err``). ``int8_activations``: the
    prefill's MoE experts on W4A8 (``--int8-activations``; CUDA, Triton backend; None: the checkpoint's choice)."""
    import qmamba
    from qmamba.cuda_graph import default_step_fn  # CUDA + triton backend: graph-captured fused decode
    from qmamba.generation import check_sampling_options, stream_generate
    from qmamba.tokenizer import resolve_tokenizer

    check_sampling_options(temperature, top_k, top_p)
    check_int8_activations(int8_activations, device, backend)
    tok = resolve_tokenizer(path, tokenizer, notice=lambda text: (err or sys.stderr).write(text + "\n"))  # fail early
    from qmamba.checkpoints.load import default_backend

    model = qmamba.load_model(path, device=device, dtype=dtype, backend=backend, cpu_int4=True,  # on CPU only
                              int8_activations=int8_activations)
    stats = stream_generate(model, tok, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, step_fn=default_step_fn(model), out=out, err=err)
    ran = {"device": str(model.embedding.weight.device), "dtype": str(model.compute_dtype).removeprefix("torch."),
           "backend": backend or default_backend(model.embedding.weight.device),
           "cpu_int4_modules": len(model.cpu_int4_modules), "int8_activations": model.int8_prefill}
    return {**stats, **ran}


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
@click.option("--seed", default=None, type=SEED, help="Seed for reproducible sampling.")
@click.option("--tokenizer", default=None, help=TOKENIZER_HELP)
@click.option("--device", default=None, help=f"Device [default: cuda when available, else cpu]: {DEVICE_HELP}.")
@click.option("--dtype", default=None, type=click.Choice(DTYPE_CHOICES),
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--backend", default=None, type=click.Choice(BACKEND_CHOICES),
              help="Sequence ops [default: triton on CUDA, reference on CPU]; onnxruntime for exported models.")
@click.option("--int8-activations/--no-int8-activations", default=None, help=INT8_ACTIVATIONS_HELP)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the generated text and timings as JSON to this file.")
def generate(path, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, device, dtype, backend,
             int8_activations, json_out):
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
            if int8_activations:
                raise UserError("--int8-activations applies to the Triton path; an ONNX export's activations are "
                                "set by `qmamba export --accuracy-level`")
            if device is not None:
                parse_device(device)  # an explicit cuda without onnxruntime's CUDA provider is an error (no fallback)
            stats = run_onnx(path, dict(options, device=device or _default_onnx_device(), out=out))
        else:
            stats = generate_text(path, **options, device=device or _default_device(), backend=backend, out=out,
                                  int8_activations=int8_activations)
    except KeyboardInterrupt:
        if not out.at_line_start:
            out.write("\n")  # "interrupted" (stderr) starts on its own line
            out.flush()
        raise
    if json_out:
        ran = {"device": device or _default_onnx_device(), "backend": backend or "onnxruntime"}  # the ONNX path
        write_json_file(json_out, {"path": str(path), **options, **ran, **stats})
