"""``qmamba create``: a random-weight checkpoint of any preset, in qmamba's or a source format."""

from __future__ import annotations

import click

from qmamba.cli.param_types import DTYPE_CHOICES, SEED
from qmamba.config import PRESETS

FORMAT_CHOICES = ("qmamba", "blackmamba", "mamba_ssm", "hf")


@click.command("create")
@click.option("--preset", "preset_name", required=True, type=click.Choice(sorted(PRESETS)),
              help="Model preset (architecture and sizes).")
@click.option("--format", "fmt", default="qmamba", show_default=True, type=click.Choice(FORMAT_CHOICES),
              help="Checkpoint format to write.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (must not exist or be empty, unless --overwrite).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Random seed.")
@click.option("--dtype", default=None, type=click.Choice(DTYPE_CHOICES),
              help="Weight dtype [default: bfloat16 for blackmamba format and BlackMamba presets, else float32].")
@click.option("--tokenizer", "tokenizer_file", default=None, type=click.Path(dir_okay=False),
              help="tokenizer.json to copy into the checkpoint [default: for the GPT-NeoX-20B vocabulary of the "
                   "BlackMamba/Mamba presets, the NeoX tokenizer shipped with qmamba; else none].")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output directory.")
def create(preset_name, fmt, out_dir, seed, dtype, tokenizer_file, overwrite):
    """Write a random-weight checkpoint of PRESET in FORMAT to OUTPUT."""
    from qmamba.checkpoints.random_init import create_checkpoint

    path = create_checkpoint(preset_name, fmt, out_dir, seed=seed, dtype=dtype, tokenizer_file=tokenizer_file,
                             overwrite=overwrite, progress=True)
    click.echo(f"wrote {fmt} checkpoint of {preset_name} (seed {seed}) to {path}")
