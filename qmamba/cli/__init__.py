"""The ``qmamba`` command line: a thin layer over the library API.

Each command lives in its own module of this package and is registered in ``COMMAND_MODULES``. Commands import
their implementation (``qmamba.calib``, ``qmamba.export``, torch) inside the command, so ``qmamba --help`` is quick
and ``qmamba info``/``generate`` work without onnx installed; ``quantize`` reads its method choices from the
torch-free registry :mod:`qmamba.calib.methods`.
"""

from __future__ import annotations

import importlib
import sys

import click

# module name in this package -> attribute holding the click command
COMMAND_MODULES = {
    "info": "info",
    "create": "create",
    "generate": "generate",
    "quantize": "quantize",
    "eval_cmd": "eval_cmd",  # the `eval` command (module name avoids the builtin)
    "export_cmd": "export_cmd",  # the `export` command
    "bench": "bench",
}


class QMambaGroup(click.Group):
    """Turns library errors that are the user's (bad paths, bad checkpoints) and bad options into one-line
    messages."""

    def invoke(self, ctx):
        from qmamba.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:  # a bad option value of a command: one line, with where to read more
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=QMambaGroup)
@click.version_option(package_name="qmamba")
def main():
    """qmamba: low-bit quantized inference for BlackMamba and Mamba models."""


for _module, _attr in COMMAND_MODULES.items():
    main.add_command(getattr(importlib.import_module(f"qmamba.cli.{_module}"), _attr))
