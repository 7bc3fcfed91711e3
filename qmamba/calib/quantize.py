"""``quantize_checkpoint(src, out, QuantizeOptions(...))``: read a float checkpoint (the one reader and builder of
:mod:`qmamba.checkpoints`), calibrate, quantize, swap in the quantized modules, write a native quantized checkpoint.

Output: a native qmamba checkpoint (written atomically by ``save_checkpoint``: a crash or Ctrl-C leaves no output
directory) whose ``manifest["quantization"]`` maps module names to format entries (``{"format": "int4",
"group_size": 128, "symmetric": false, "method": "gptq"}``) and whose ``manifest["quantization_info"]`` records
the run: method and options, recipe, calibration data (source, N, L, sha256 of the token ids), source file
hashes, library versions, the summary table and the router agreement. Non-quantized tensors keep the source's
dtype (AWQ-folded norm/router weights included, so a bf16 source rounds them to bf16). The output carries the
tokenizer (:func:`qmamba.tokenizer.resolve_tokenizer`: the source's, ``--tokenizer``, or GPT-NeoX-20B's shipped
with qmamba for that vocabulary).

Data: GPTQ, AWQ and distillation calibrate on ``calib`` (default: the train text shipped with qmamba). RTN and 1-bit
PTB read no data unless ``calib`` is given or ``report=True``. The router-agreement report (MoE models: top-1
expert of the quantized model vs the float one) runs when data is used, or when asked, on at most
``report_tokens`` tokens.

Memory: the model stays on the CPU in the checkpoint's dtype; calibration moves one block at a time to ``device``
in float32 (see :mod:`qmamba.calib.pipeline`). Distillation needs the whole student and teacher on ``device``.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qmamba.checkpoints.files import hash_files
from qmamba.devices import resolve_device
from qmamba.errors import UserError
from qmamba.quant.modules import swap_quantized_modules

from qmamba.calib.data import DEFAULT_CALIBRATION, load_calibration
from qmamba.calib.pipeline import CalibOptions, calibrate, move_module, plan_needs_data, record_routing_blockwise
from qmamba.calib.recipe import build_plan, load_recipe, resolve_options
from qmamba.calib.report import format_table, summarize

if TYPE_CHECKING:
    from qmamba.calib.distill import DistillOptions


def source_record(src: Path, manifest: dict) -> dict:
    directory = src if src.is_dir() else src.parent
    files = hash_files(directory, [p.name for p in directory.iterdir() if p.is_file()])
    return {"format": manifest.get("format"), "path": str(src), "files": files, "origin": manifest.get("source")}


def versions() -> dict:
    import tokenizers

    from qmamba.checkpoints.manifest import FORMAT_VERSION, qmamba_version

    return {"qmamba": qmamba_version(), "checkpoint_format": FORMAT_VERSION, "torch": torch.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}


@dataclass
class QuantizeOptions:
    """What ``quantize_checkpoint`` does; the defaults are ``qmamba quantize``'s (each field is one of its options).

    ``bits``/``group_size``/``symmetric``/``method`` (a name of :data:`qmamba.calib.methods.SELECTABLE_METHODS`)
    apply to the modules selected by default (plus the head with ``quantize_head``, x_proj/dt_proj with
    ``quantize_xdt``); a ``recipe`` file overrides them per module. ``calib``: ``["corpus"]``, ``["full"]`` or text
    files, cut into ``nsamples`` windows of ``seq_len`` tokens (corpus windows drawn with ``seed``); ``None``: the
    shipped train text when the plan needs data (GPTQ/AWQ/distillation), else no data (RTN/PTB are data-free).
    ``tokenizer``: ``--tokenizer`` (file, directory or hub id), default as :func:`qmamba.tokenizer.resolve_tokenizer`
    finds it (the checkpoint's, else the shipped GPT-NeoX-20B one for its vocabulary). ``device``: where calibration
    runs, one block at a time. ``calibration``: the walk's own settings. ``distill``: a
    :class:`qmamba.calib.distill.DistillOptions` to distill the 1-bit modules against the float model after PTB.
    ``report``: the router-agreement report of MoE models (``None``: when data is used) on at most
    ``report_tokens`` tokens. ``route_aware`` (MoE models): a fraction of the planned parameters moved from int4 to
    int8, the matrices that move the routing most per parameter, measured on ``report_tokens`` calibration tokens
    (:func:`qmamba.calib.route_fit.routing_sensitivity`). ``calibration.refit_routers`` (MoE models): refit the float routers to the float
    model's router logits during the walk (:mod:`qmamba.calib.route_fit`; uses the calibration data, size unchanged).

    ``group_size`` / ``method`` ``None``: the defaults (128 for int4; GPTQ, PTB for 1-bit). Options that do not
    apply (a method with ``bits=1``, a group size with ``bits=8``, ``symmetric`` outside int4, ``act_order``
    without GPTQ, ``distill`` without 1-bit modules) are errors, checked by :meth:`settings` before anything is
    read.
    """

    bits: int = 4
    group_size: int | None = None
    method: str | None = None
    symmetric: bool = False
    calib: Sequence[str] | None = None
    nsamples: int = 128
    seq_len: int = 512
    recipe: str | None = None
    quantize_head: bool = False
    quantize_xdt: bool = False
    device: str | None = None
    tokenizer: str | None = None
    seed: int = 0
    overwrite: bool = False
    calibration: CalibOptions = field(default_factory=CalibOptions)
    distill: DistillOptions | None = None
    report: bool | None = None
    report_tokens: int = 4096
    route_aware: float | None = None

    def settings(self) -> dict:
        """The command-line level settings checked and completed (``{"bits", "group_size", "symmetric",
        "method"}``, what the manifest records); raises :class:`qmamba.errors.ConfigError` /
        :class:`qmamba.errors.UserError` for options that do not apply. A recipe may still give 1-bit or GPTQ
        modules: those checks are then made on the plan."""
        settings = resolve_options(self.bits, self.group_size, self.method, self.symmetric,
                                   act_order=self.calibration.act_order and not self.recipe)
        if self.distill is not None and self.bits != 1 and not self.recipe:
            raise UserError(f"--distill trains 1-bit modules: use --bits 1 (not {self.bits}) or a recipe with "
                            "bits: 1")
        for name, value, minimum in (("nsamples", self.nsamples, 1), ("seq_len", self.seq_len, 2),
                                     ("report_tokens", self.report_tokens, 1), ("seed", self.seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return settings


def _route_aware_plan(model, plan: dict, ids, budget: float, device, opts: CalibOptions, log) -> dict:
    """Move the int4 matrices that move the routing most (per parameter) to int8 in ``plan`` (in place), within
    ``budget`` (a fraction of the planned parameters); returns the record for the manifest."""
    from qmamba.calib.recipe import PlanEntry
    from qmamba.calib.route_sensitivity import module_weight, pick_route_sensitive, routing_sensitivity
    from qmamba.quant.formats import make_format

    candidates = {name: e for name, e in plan.items() if getattr(e.fmt, "bits", 0) == 4}
    agreement = routing_sensitivity(model, ids, candidates, device, opts.batch_size, opts.progress)
    n_params = {name: module_weight(model, name).numel() for name in agreement}
    total = sum(module_weight(model, name).numel() for name in plan if name != "lm_head") + (
        model.lm_head.weight.numel() if "lm_head" in plan else 0)
    picked = pick_route_sensitive(agreement, n_params, budget * total)
    for name in picked:
        plan[name] = PlanEntry(make_format(8), plan[name].method)
    log(f"route-aware: int8 for {', '.join(picked) or 'nothing'} ({sum(n_params[n] for n in picked)} of {total} "
        f"parameters; routing agreement with that module alone in int4: "
        + ", ".join(f"{n} {100 * agreement[n]:.2f}%" for n in picked) + ")")
    return {"budget": budget, "tokens": int(ids.numel()), "int8": picked,
            "agreement_alone": {n: round(a, 5) for n, a in agreement.items()}}


def quantize_checkpoint(src, out, options: QuantizeOptions | None = None, *, log=print) -> dict:
    """Quantize checkpoint ``src`` into native checkpoint ``out`` as ``options`` say; returns the run record (also
    in the manifest)."""
    from qmamba.checkpoints.files import check_output_dir
    from qmamba.checkpoints.detect import detect_checkpoint, open_checkpoint, resolve_checkpoint_dir
    from qmamba.checkpoints.load import model_from_checkpoint
    from qmamba.checkpoints.native import save_checkpoint
    from qmamba.checkpoints.peek import config_of, manifest_of
    from qmamba.checkpoints.shapes import meta_model
    from qmamba.calib.int8_check import int8_activation_check
    from qmamba.eval import routing_agreement
    from qmamba.tokenizer import TokenizerError, resolve_tokenizer

    options = options or QuantizeOptions()
    src, out = Path(src), Path(out)
    check_output_dir(out, options.overwrite)
    opts, distill, recipe = options.calibration, options.distill, options.recipe
    settings = options.settings()  # options that do not apply: errors before anything is read
    device = resolve_device(options.device)
    recipe_data = load_recipe(recipe) if recipe else None
    directory = resolve_checkpoint_dir(src)
    detected = detect_checkpoint(directory)  # config.json parsed once, here
    cfg = config_of(directory, detected[0], detected[1])
    if manifest_of(directory, detected[0]).get("quantization"):  # before reading any weight
        raise UserError(f"{src} is already quantized; quantize its float source instead")
    skeleton = meta_model(cfg)  # planned on now, filled by the one builder once the weights are read
    plan = build_plan(skeleton, options.bits, options.group_size, options.symmetric, options.method,
                      options.quantize_head, options.quantize_xdt, recipe_data)
    if distill is not None and not any(getattr(e.fmt, "bits", 0) == 1 for e in plan.values()):
        raise UserError("--distill trains 1-bit modules: use --bits 1 or a recipe with bits: 1")
    if opts.act_order and not any(e.method == "gptq" for e in plan.values()):
        raise UserError("--act-order applies to GPTQ only, and no module is quantized with GPTQ")
    calib, seq_len = options.calib, options.seq_len
    if (opts.refit_routers or options.route_aware) and not cfg.moe_layer_ids:
        raise UserError("--refit-routers and --route-aware apply to MoE models; this one has no MoE layer")
    if options.route_aware is not None and not 0 < options.route_aware < 1:
        raise UserError(f"--route-aware-budget must be a fraction in (0, 1), got {options.route_aware!r}")
    calibrates = (distill is not None or plan_needs_data(plan) or calib is not None or opts.refit_routers
                  or bool(options.route_aware))
    want_report = bool(cfg.moe_layer_ids) and (options.report if options.report is not None else calibrates)
    try:
        tok = resolve_tokenizer(directory, options.tokenizer, cfg.vocab_size)
    except TokenizerError as exc:
        if calibrates or want_report or options.tokenizer is not None:
            raise
        tok = None
        log(f"note: the output will have no tokenizer.json ({exc})")
    n_report = max(1, math.ceil(options.report_tokens / seq_len))
    data = report_data = None
    if calibrates:
        data = load_calibration(calib or DEFAULT_CALIBRATION, tok, options.nsamples, seq_len, options.seed,
                                cfg.vocab_size)
        if distill is not None and distill.checkpoint_dir:  # a resume on other data: refused before any work
            from qmamba.calib.distill import check_resume_data

            check_resume_data(distill.checkpoint_dir, data.ids)
        report_ids = data.ids[:n_report]
    elif want_report:
        report_data = load_calibration(DEFAULT_CALIBRATION, tok, n_report, seq_len, options.seed, cfg.vocab_size)
        report_ids = report_data.ids

    # the weights, read once (source_record hashes every file: hash_files=False here)
    checkpoint = open_checkpoint(directory, hash_files=False, detected=detected, skeleton=skeleton)
    del skeleton
    cfg, manifest = checkpoint.config, checkpoint.manifest
    source_dtypes = {k: v.dtype for k, v in checkpoint.state_dict.items()}
    model = model_from_checkpoint(checkpoint, "cpu", None)  # on the CPU, in the checkpoint's dtypes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    fp_routes = None
    if want_report:
        fp_routes = record_routing_blockwise(model, report_ids, device, opts.batch_size, opts.progress,
                                             "report: float routing")
    route_aware = None
    if options.route_aware:
        route_aware = _route_aware_plan(model, plan, report_ids, options.route_aware, device, opts, log)
    teacher = copy.deepcopy(model) if distill is not None else None  # the float model, before any fold
    router_fits: dict = {}
    results = calibrate(model, data.ids if data is not None else None, plan, opts, device=device,
                        router_fits=router_fits)
    if router_fits:
        log("router refit (top-1 agreement with the float router on the calibration tokens, before -> after): "
            + ", ".join(f"L{i}: {100 * f['before']:.1f}% -> {100 * f['after']:.1f}%" for i, f in router_fits.items()))
    swap_quantized_modules(model, {name: r.fmt for name, r in results.items()},
                           {name: r.packed for name, r in results.items()})
    distill_report = None
    if teacher is not None:
        from qmamba.calib.distill import distill as run_distillation

        move_module(model, device, torch.float32)  # float parameters in float32; packed tensors as they are
        move_module(teacher, device, getattr(torch, distill.teacher_dtype))  # bfloat16: half the teacher's memory
        distill_report = run_distillation(model, teacher, data.ids.to(device), distill, log=log)
        del teacher
        if distill_report["steps"] > 0:  # steps of this run and of a resumed checkpoint
            for r in results.values():
                if getattr(r.fmt, "bits", 0) == 1:
                    r.method = "ptb+distill"
    router = int8_check = None
    if want_report:
        routes = record_routing_blockwise(model, report_ids, device, opts.batch_size, opts.progress,
                                          "report: quantized routing")
        router = routing_agreement(fp_routes, routes)
        router["tokens"] = int(report_ids.numel())
        int8_check = int8_activation_check(model, report_ids, device, opts.batch_size, opts.progress)
        if int8_check is not None:
            log(f"int8 activations (the W4A8 prefill of the int4 experts): KL {int8_check['kl']:.2e} nats/token, "
                f"top-1 agreement {100 * int8_check['top1_agreement']:.2f}% on {int8_check['tokens']} tokens -> "
                + ("on by default" if int8_check["prefill_default"] else
                   f"off (above {int8_check['kl_limit']:.0e}); --int8-activations turns it on"))
    seconds = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    bytes_per_param = {}
    for name in results:
        key = name if name.split(".")[-1] in ("fc1", "fc2") else f"{name}.weight"
        dtype = source_dtypes.get(key, source_dtypes.get("embedding.weight", torch.float32))
        bytes_per_param[name] = torch.empty(0, dtype=dtype).element_size()
    rows = summarize(results, bytes_per_param)
    log(format_table(rows, router, seconds))
    if peak_gpu is not None:
        log(f"peak GPU memory: {peak_gpu / 2**30:.2f} GiB")

    entries = {name: r.manifest_entry() for name, r in results.items()}
    out_sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and k in source_dtypes and not any(k.startswith(n + ".") for n in entries):
            v = v.to(source_dtypes[k])
        out_sd[k] = v.detach().cpu()
    info = {**settings, "quantize_head": options.quantize_head,
            "quantize_xdt": options.quantize_xdt, "options": asdict(opts),
            "recipe": {"path": str(recipe), "content": recipe_data} if recipe else None,
            "calibration": data.describe() if data is not None else None,
            "report_data": report_data.describe() if report_data is not None else None,
            "device": str(device), "peak_gpu_bytes": peak_gpu,
            "tokenizer": {"origin": tok.origin, "file": str(tok.path)} if tok is not None else None,
            "versions": versions(), "seconds": round(seconds, 2),
            "summary": rows, "router_agreement": router, "distillation": distill_report,
            "router_refit": {str(i): f for i, f in router_fits.items()} or None, "route_aware": route_aware,
            "int8_activations": int8_check}
    save_checkpoint(out_sd, cfg, out, source=source_record(directory, manifest), quantization=entries,
                    extra={"quantization_info": info}, tokenizer_file=tok.path if tok is not None else None,
                    overwrite=options.overwrite)
    return info
