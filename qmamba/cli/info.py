"""``qmamba info PATH``: what a checkpoint holds (format, layer plan, parameter counts by kind, bytes)."""

from __future__ import annotations

import json

import click


@click.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(path: str, as_json: bool):
    """Describe the checkpoint at PATH (a directory in any supported format, or a hub id)."""
    from qmamba.checkpoints.summary import checkpoint_summary, format_summary

    summary = checkpoint_summary(path)
    click.echo(json.dumps(summary, indent=2, sort_keys=True) if as_json else format_summary(summary))
