"""``qmamba export PATH -o OUT.onnx``: export a checkpoint to ONNX (see :mod:`qmamba.export.exporter`)."""

from __future__ import annotations

import click

from qmamba.errors import UserError


def _export_module():
    try:
        from qmamba.export import exporter, graph
    except ModuleNotFoundError as exc:
        if exc.name not in ("onnx", "onnxruntime") and not str(exc.name).startswith("onnx."):
            raise
        raise UserError(f"ONNX export needs the Python package {exc.name!r}, which is not installed; "
                        "install it with: pip install 'qmamba[export]'") from None
    return exporter, graph


@click.command("export")
@click.argument("path")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Output file (.onnx).")
@click.option("--scan", default="linear-attention", show_default=True, type=click.Choice(["linear-attention", "scan"]),
              help="Body of the qmamba::SelectiveScan function: com.microsoft.LinearAttention or portable ONNX Scan.")
@click.option("--opset", default=21, show_default=True, type=int, help="ai.onnx opset (20..26).")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Activation / float weight dtype of the graph.")
@click.option("--conv", default="auto", show_default=True,
              type=click.Choice(["auto", "causal-conv-with-state", "plain"]),
              help="Causal conv: com.microsoft.CausalConvWithState or plain Concat+Conv "
                   "(auto: plain with --scan scan).")
@click.option("--accuracy-level", default=4, show_default=True, type=click.IntRange(0, 4),
              help="MatMulNBits accuracy_level for quantized weights: 4 = int8 activations (1.3-1.7x faster CPU decode, "
                   "+0.009% perplexity on the int4 fixture), 0 = exact (benchmarks/onnx_accuracy_level.md).")
@click.option("--external-data", default="auto", show_default=True, type=click.Choice(["auto", "always", "never"]),
              help="Store weights in OUT.onnx.data (auto: when they exceed 512 MiB).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export_cmd(path, output, scan, opset, dtype, conv, accuracy_level, external_data, overwrite):
    """Export the checkpoint at PATH to an ONNX model that onnxruntime runs (prefill and decode)."""
    exporter, graph = _export_module()
    options = graph.ExportOptions(scan=scan, opset=opset, dtype=dtype, conv=conv, accuracy_level=accuracy_level)
    options.validate()
    summary = exporter.export_checkpoint(path, output, options, external_data=external_data, overwrite=overwrite)
    click.echo(summary.describe())
