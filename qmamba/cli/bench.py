"""``qmamba bench PATH``: prefill and decode speed, peak memory and weight bytes, one line per batch size.

What ``llama-bench`` is to llama.cpp: a seeded random prompt of ``--prompt-len`` tokens per row, then ``--tokens``
greedy decode steps through the path ``qmamba generate`` uses (the CUDA-graph fused step on CUDA). Before any
figure is reported the decode path is checked against the pure-PyTorch reference on a short greedy prefix
(:mod:`qmamba.bench`); a mismatch is an error (exit 1), not a number.
"""

from __future__ import annotations

import sys

import click

from qmamba.cli.param_types import DEVICE_HELP, DTYPE_CHOICES, INT8_ACTIVATIONS_HELP, check_int8_activations


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter("batch sizes must be positive integers")
    return items


@click.command("bench")
@click.argument("path")
@click.option("--batch", "batches", default="1", show_default=True, callback=_int_list,
              help="Batch sizes, comma-separated (e.g. 1,8).")
@click.option("--prompt-len", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens per row (prefill).")
@click.option("--tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Decode steps timed per batch size.")
@click.option("--check-tokens", default=8, show_default=True, type=click.IntRange(min=1),
              help="Greedy steps compared with the reference path before timing.")
@click.option("--device", default=None, help=f"Device [default: cuda when available, else cpu]: {DEVICE_HELP}.")
@click.option("--dtype", default=None, type=click.Choice(DTYPE_CHOICES),
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--check-dtype", default="float32", show_default=True, type=click.Choice(["float32", "same"]),
              help="Precision of the check: a float32 twin of the model (rounding-level differences stay far from "
                   "a top-1 margin) or the timed dtype itself.")
@click.option("--prefill", "prefill_path", default="eager", show_default=True, type=click.Choice(["eager", "graph"]),
              help="How the prefill is timed: eager (what qmamba generate runs) or graph (CUDA: the prompt in "
                   "power-of-two chunks, each a captured CUDA graph; checked against the eager prefill first).")
@click.option("--int8-activations/--no-int8-activations", default=None, help=INT8_ACTIVATIONS_HELP)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the rows as JSON to this file (the path is checked before the benchmark).")
def bench(path, batches, prompt_len, tokens, check_tokens, check_dtype, device, dtype, prefill_path, int8_activations,
          json_out):
    """Benchmark the checkpoint at PATH (checked figures only)."""
    import torch

    import qmamba
    from qmamba.bench import BenchCheckError, bench_model, format_table
    from qmamba.output_files import check_output_file, write_json_file

    if json_out:
        check_output_file(json_out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if prefill_path == "graph" and not str(device).startswith("cuda"):
        raise click.UsageError("--prefill graph needs a CUDA device (CUDA graphs)")
    check_int8_activations(int8_activations, device)
    model = qmamba.load_model(path, device=device, dtype=dtype, cpu_int4=True,  # the path qmamba generate runs
                              int8_activations=int8_activations)

    def float32_twin():
        return qmamba.load_model(path, device=device, dtype="float32", int8_activations=model.int8_activations)

    twin = float32_twin if check_dtype == "float32" and model.compute_dtype != torch.float32 else None
    try:
        rows = bench_model(model, batches, prompt_len, tokens, check_tokens,
                           log=lambda s: click.echo(s, err=True), check_model=twin,
                           prefill_graph=prefill_path == "graph")
    except BenchCheckError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(format_table(rows))
    if json_out:
        write_json_file(json_out, dict(path=str(path), int8_activations=model.int8_prefill,
                                       rows=[r.as_dict() for r in rows]))
