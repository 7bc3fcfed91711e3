"""``qmamba eval PATH``: perplexity (sliding window) and LAMBADA; ``--compare A B`` (logic in qmamba.eval)."""

from __future__ import annotations

import click

from qmamba.cli.param_types import (DEVICE_HELP, DTYPE_CHOICES, INT8_ACTIVATIONS_HELP, TOKENIZER_HELP, CountOrAll,
                                   check_int8_activations)
from qmamba.errors import UserError

DEFAULT_MAX_TOKENS = 32768  # default perplexity budget; see the --max-tokens help


def _format_result(r: dict) -> str:
    lines = [r["path"]]
    if "perplexity" in r:
        p = r["perplexity"]
        scored = (f"{p['tokens']} tokens" if p.get("max_tokens") is None or p["text_tokens"] <= p["max_tokens"]
                  else f"{p['tokens']} tokens: the first {p['max_tokens']} of {p['text_tokens']}, "
                       "--max-tokens all for every token")
        lines.append(f"  perplexity {p['ppl']:.4f} on {p['data']} ({scored}; seq_len {p['seq_len']}, "
                     f"stride {p['stride']})")
    if "lambada" in r:
        lam = r["lambada"]
        lines.append(f"  LAMBADA accuracy {100 * lam['accuracy']:.2f}% ({lam['records']} records), "
                     f"continuation perplexity {lam['continuation_ppl']:.2f}")
    if r.get("int8_activations"):
        lines.append("  prefill on int8 activations (W4A8 experts, as the checkpoint's check or --int8-activations "
                     "chose; --no-int8-activations for the exact int4 path)")
    if "bytes_on_disk" in r:
        lines.append(f"  size on disk {r['bytes_on_disk'] / 2**20:.3f} MiB")
    return "\n".join(lines)


@click.command("eval")
@click.argument("path", required=False)
@click.option("--data", default="corpus:heldout", show_default=True,
              help="Text: corpus:heldout[/NAME] (shipped with qmamba), full:heldout[/NAME] (the full corpus in "
                   "$QMAMBA_DATA_DIR or ../shared/data), hub:NAME[,CONFIG][@SPLIT] (a hub dataset, test split by "
                   "default; needs the datasets package), a file; 'none' to skip perplexity.")
@click.option("--lambada", "do_lambada", is_flag=True,
              help="Also LAMBADA last-word accuracy (OpenAI test split, shipped with qmamba).")
@click.option("--lambada-limit", type=click.IntRange(min=1), default=None,
              help="Only the first N LAMBADA records [default: all].")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Perplexity window.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Window step, at most --seq-len [default: seq-len, non-overlapping].")
@click.option("--max-tokens", type=CountOrAll(), default=str(DEFAULT_MAX_TOKENS), show_default=True,
              help="Score only the first N tokens of the text (the default takes under a minute for the built-in "
                   "model on 2 CPU cores); 'all' for every token (corpus:heldout has ~626k).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows per forward pass.")
@click.option("--tokenizer", type=click.Path(), default=None,
              help=TOKENIZER_HELP)
@click.option("--device", default=None, help=f"Device [default: cpu]: {DEVICE_HELP}.")
@click.option("--dtype", default=None, type=click.Choice(DTYPE_CHOICES),
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--backend", default=None, type=click.Choice(["reference", "triton"]),
              help="Sequence ops [default: triton on CUDA, reference on CPU].")
@click.option("--int8-activations/--no-int8-activations", default=None, help=INT8_ACTIVATIONS_HELP)
@click.option("--compare", nargs=2, default=None, metavar="A B",
              help="Evaluate two checkpoints with one tokenizer, print B - A.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the results as JSON (the path is checked before evaluating).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def eval_cmd(path, data, do_lambada, lambada_limit, seq_len, stride, max_tokens, batch_size, tokenizer, device,
             dtype, backend, int8_activations, compare, json_out, no_progress):
    """Evaluate the checkpoint at PATH (or two with --compare A B)."""
    from qmamba.eval import compare_checkpoints, evaluate_checkpoint
    from qmamba.output_files import check_output_file, write_json_file

    if bool(path) == bool(compare):
        raise UserError("give either PATH or --compare A B")
    data = None if data in ("none", "") else data
    if data is None and not do_lambada:
        raise UserError("nothing to evaluate: --data none and no --lambada")
    if stride is not None and stride > seq_len:
        raise click.BadParameter(f"{stride} is larger than --seq-len {seq_len}", param_hint="'--stride'")
    check_int8_activations(int8_activations, device or "cpu", backend)
    if json_out:
        check_output_file(json_out)
    kwargs = dict(data=data, do_lambada=do_lambada, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                  lambada_limit=lambada_limit, batch_size=batch_size, progress=not no_progress)
    common = dict(tokenizer_path=tokenizer, device=device, dtype=dtype, backend=backend,
                  int8_activations=int8_activations)
    result = (compare_checkpoints(*compare, **common, **kwargs) if compare
              else evaluate_checkpoint(path, **common, **kwargs))
    if compare:
        click.echo(_format_result(result["a"]))
        click.echo(_format_result(result["b"]))
        d = result["delta"]
        if "ppl" in d:
            click.echo(f"delta perplexity (B - A): {d['ppl']:+.4f} ({100 * d['ppl_relative']:+.2f}%)")
        if "lambada_accuracy" in d:
            click.echo(f"delta LAMBADA accuracy (B - A): {100 * d['lambada_accuracy']:+.2f} points")
        if "router_agreement" in result:
            ra = result["router_agreement"]
            click.echo(f"router top-1 agreement B vs A: {100 * ra['overall']:.2f}% ({ra['tokens']} tokens per MoE "
                       "layer, the positions scored)")
            click.echo("  per layer: " + ", ".join(f"L{i} {100 * a:.2f}%" for i, a in ra["per_layer"].items()))
    else:
        click.echo(_format_result(result))
    if json_out:
        write_json_file(json_out, result)
