"""Click parameter types and option texts shared by the commands (values are checked by click, before any work)."""

from __future__ import annotations

import click

DEVICE_HELP = "cpu, cuda or cuda:N; checked against this machine"
TOKENIZER_HELP = ("tokenizer.json or hub id (default: the checkpoint's; for the GPT-NeoX vocabulary of "
                  "BlackMamba/Mamba without one, the NeoX tokenizer shipped with qmamba).")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
INT8_ACTIVATIONS_HELP = ("CUDA, Triton backend: a prefill's int4 MoE expert matmuls (64 prompt tokens or more) on "
                         "int8-rounded activations and int8 tensor cores (W4A8): a faster prefill with slightly "
                         "different numbers; decode is unchanged. Default: what `qmamba quantize` decided from its "
                         "check on the calibration text (`qmamba info` shows it), else off. Compare with "
                         "`qmamba eval --device cuda` with either flag.")


def check_int8_activations(enabled: bool | None, device, backend=None) -> None:
    """``--int8-activations`` (``enabled`` True) needs the W4A8 kernels: a CUDA device and the Triton backend (a
    clear error, not a switch that silently does nothing)."""
    from qmamba.errors import UserError

    if enabled is True and (not str(device).startswith("cuda") or backend not in (None, "triton")):
        raise UserError(f"--int8-activations runs the W4A8 prefill kernels on CUDA with the Triton backend; this run "
                        f"is on {device}" + (f" with the {backend} backend" if backend else ""))


# torch generators take seeds below 2**64; distillation adds its step number to the seed, so stay below 2**63
SEED = click.IntRange(0, 2**63 - 1)


class IntChoice(click.Choice):
    """A choice among integers, listed in the help (``--bits [1|4|8]``); the value is an ``int``."""

    def __init__(self, values):
        super().__init__([str(v) for v in values])

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return int(super().convert(value, param, ctx))


class CountOrAll(click.ParamType):
    """A positive integer, or ``all`` (-> ``None``: no limit)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a positive integer or 'all'", param, ctx)
        if number < 1:
            self.fail(f"{number} is not a positive integer (use 'all' for no limit)", param, ctx)
        return number
