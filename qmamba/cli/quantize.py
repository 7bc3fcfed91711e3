"""``qmamba quantize SRC -o OUT``: calibrate and quantize a float checkpoint (logic in qmamba.calib.quantize)."""

from __future__ import annotations

import click

from qmamba.calib.methods import SELECTABLE_METHODS
from qmamba.cli.param_types import DEVICE_HELP, SEED, TOKENIZER_HELP, IntChoice
from qmamba.quant.layout import INT4_GROUP_SIZES

DISTILL_OPTIONS = ("distill_steps", "distill_time", "distill_lr", "distill_batch", "ste", "distill_norms",
                   "distill_float", "distill_checkpoint", "distill_block_steps",
                   "distill_teacher_dtype")


@click.command("quantize")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, help="Output directory (native qmamba checkpoint).")
@click.option("--bits", type=IntChoice([1, 4, 8]), default="4", show_default=True,
              help="Weight bits: 4 (group-wise), 8 (per channel) or 1 (binary, Bi-Mamba form; PTB init).")
@click.option("--group-size", type=IntChoice(INT4_GROUP_SIZES), default=None,
              help="int4 group size along K [default: 128]; 4-bit only.")
@click.option("--method", type=click.Choice(SELECTABLE_METHODS), default=None,
              help="Calibration method for 4- and 8-bit [default: gptq]; 1-bit always uses PTB.")
@click.option("--symmetric", is_flag=True, help="Symmetric int4 (zero point 8) instead of asymmetric; 4-bit only.")
@click.option("--act-order", is_flag=True, help="GPTQ: columns by descending Hessian diagonal (static groups).")
@click.option("--calib", multiple=True, default=None,
              help="Calibration text: 'corpus' (the train text shipped with qmamba; the default for GPTQ, AWQ and "
                   "--distill), 'full' (the full corpus in $QMAMBA_DATA_DIR or ../shared/data), hub datasets "
                   "(hub:NAME[,CONFIG][@SPLIT], with the datasets package) or text files (repeat the option). RTN "
                   "and 1-bit PTB use no data unless given.")
@click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Calibration sequences.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--recipe", type=click.Path(), default=None, help="YAML/JSON recipe overriding settings per module.")
@click.option("--quantize-head", is_flag=True, help="Also quantize lm_head (the embedding stays in float).")
@click.option("--quantize-xdt", is_flag=True, help="Also quantize x_proj and dt_proj.")
@click.option("--min-expert-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Experts with fewer routed tokens use statistics from all tokens (logged fallback).")
@click.option("--refit-routers", is_flag=True,
              help="MoE: refit each (float) router to the float model's router logits on the quantized model's "
                   "inputs during calibration (keeps top-1 routing; same size; uses calibration data, also with "
                   "RTN). See docs/routing.md.")
@click.option("--route-aware", is_flag=True,
              help="MoE: int8 for the int4 matrices that move the routers most (a sensitivity pass on "
                   "--report-tokens calibration tokens), within --route-aware-budget. See docs/routing.md.")
@click.option("--route-aware-budget", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              default=0.06, show_default=True,
              help="--route-aware: fraction of the quantized parameters that may move to int8.")
@click.option("--report/--no-report", default=None,
              help="Router top-1 agreement of the quantized model with the float one (MoE models) on a few "
                   "calibration tokens [default: when calibration data is used].")
@click.option("--report-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Token budget of --report.")
@click.option("--tokenizer", type=click.Path(), default=None,
              help=TOKENIZER_HELP)
@click.option("--device", default=None,
              help=f"Device for calibration [default: cpu]: {DEVICE_HELP}; one block at a time goes there, the "
                   "model stays on the CPU.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the corpus calibration windows.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--distill", is_flag=True, help="1-bit: distill alpha/beta against the float model on the calibration "
              "sequences (soft cross-entropy / KL to its next-token distribution).")
@click.option("--distill-steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Distillation steps (upper bound; a resumed run counts the saved steps).")
@click.option("--distill-time", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Distillation wall-clock budget in seconds.")
@click.option("--distill-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Distillation peak learning rate.")
@click.option("--distill-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per distillation step.")
@click.option("--ste", is_flag=True, help="Distillation also updates the signs (straight-through estimator).")
@click.option("--distill-norms", is_flag=True, help="Distillation also trains the norm weights.")
@click.option("--distill-float", is_flag=True,
              help="Distillation also trains every other float parameter except the embedding (conv, dt, A, D, router).")
@click.option("--distill-checkpoint", type=click.Path(), default=None,
              help="Directory for distillation checkpoints; an existing one is resumed.")
@click.option("--distill-block-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Before the KL: steps per block training each block alone to reproduce the float model's "
              "residual stream after it (0: off). Counts towards --distill-time.")
@click.option("--distill-teacher-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="The float teacher's parameters during distillation (bfloat16: half its memory, "
              "for a GPU that cannot hold a float32 copy of the model).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the run record (as stored in the manifest) as JSON to this file.")
def quantize(src, out, bits, group_size, method, symmetric, act_order, calib, nsamples, seq_len, recipe,
             quantize_head, quantize_xdt, min_expert_tokens, refit_routers, route_aware,
             route_aware_budget, report, report_tokens, tokenizer, device, seed,
             overwrite, no_progress,
             distill, distill_steps, distill_time, distill_lr, distill_batch, ste, distill_norms, distill_float,
             distill_checkpoint, distill_block_steps, distill_teacher_dtype, json_out):
    """Quantize the float checkpoint SRC into OUT (int8 / int4, RTN / GPTQ / AWQ, MoE-aware; 1-bit binary with
    PTB and optional distillation)."""
    from qmamba.calib.pipeline import CalibOptions
    from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
    from qmamba.output_files import check_output_file, write_json_file

    if json_out:
        check_output_file(json_out)
    opts = CalibOptions(act_order=act_order, min_expert_tokens=min_expert_tokens, refit_routers=refit_routers,
                        progress=not no_progress)
    distill_opts = None
    if distill:
        from qmamba.calib.distill import DistillOptions

        distill_opts = DistillOptions(steps=distill_steps, time_budget=distill_time, lr=distill_lr,
                                      batch_size=distill_batch, ste=ste, train_norms=distill_norms,
                                      train_float=distill_float, checkpoint_dir=distill_checkpoint, seed=seed,
                                      block_steps=distill_block_steps, teacher_dtype=distill_teacher_dtype,
                                      progress=not no_progress)
    else:
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in DISTILL_OPTIONS
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --distill")
    if not route_aware and click.get_current_context().get_parameter_source("route_aware_budget") == \
            click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--route-aware-budget only applies with --route-aware")
    options = QuantizeOptions(bits=bits, group_size=group_size, method=method, symmetric=symmetric,
                              calib=list(calib) or None, nsamples=nsamples, seq_len=seq_len, recipe=recipe,
                              quantize_head=quantize_head, quantize_xdt=quantize_xdt, device=device,
                              tokenizer=tokenizer, seed=seed, overwrite=overwrite, calibration=opts,
                              distill=distill_opts, report=report, report_tokens=report_tokens,
                              route_aware=route_aware_budget if route_aware else None)
    info = quantize_checkpoint(src, out, options, log=click.echo)
    if json_out:
        write_json_file(json_out, {"source": src, "output": out, **info})
    click.echo(f"wrote {out}")
