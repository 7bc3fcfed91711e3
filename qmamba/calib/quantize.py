"""``quantize_checkpoint``: read a float checkpoint, calibrate, quantize, write a native quantized checkpoint.

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
import hashlib
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qmamba.errors import UserError
from qmamba.moe import StackedExperts
from qmamba.quant.modules import experts_class_for, linear_class_for

from qmamba.calib.data import DEFAULT_CALIBRATION, load_calibration
from qmamba.calib.pipeline import (CalibOptions, ModuleResult, calibrate, move_module, plan_needs_data,
                                   record_routing_blockwise)
from qmamba.calib.recipe import build_plan, load_recipe
from qmamba.calib.report import format_table, summarize


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_record(src: Path, manifest: dict) -> dict:
    directory = src if src.is_dir() else src.parent
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    return {"format": manifest.get("format"), "path": str(src), "files": files, "origin": manifest.get("source")}


def versions() -> dict:
    import tokenizers

    from qmamba.checkpoints.manifest import FORMAT_VERSION

    try:
        from importlib.metadata import version

        qmamba_version = version("qmamba")
    except Exception:  # not installed as a distribution
        qmamba_version = "unknown"
    return {"qmamba": qmamba_version, "checkpoint_format": FORMAT_VERSION, "torch": torch.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version()}


def apply_packed(model: nn.Module, results: dict[str, ModuleResult]) -> nn.Module:
    """Replace the calibrated float modules by quantized twins holding the packed results."""
    experts: dict[str, dict] = {}
    for name, r in results.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in ("fc1", "fc2") and isinstance(model.get_submodule(parent), StackedExperts):
            experts.setdefault(parent, {})[leaf] = r
            continue
        linear = model.get_submodule(name)
        packed = {k: v.to(linear.weight.device) for k, v in r.packed.items()}
        new = linear_class_for(r.fmt).from_linear(linear, r.fmt, packed)
        _set(model, name, new)
    for parent, parts in experts.items():
        old = model.get_submodule(parent)
        fc1, fc2 = parts.get("fc1"), parts.get("fc2")
        fmt1, fmt2 = fc1.fmt if fc1 else None, fc2.fmt if fc2 else None
        new = experts_class_for(fmt1, fmt2).from_stacked(old, fmt1, fmt2,
                                        fc1.packed if fc1 else None, fc2.packed if fc2 else None)
        _set(model, parent, new)
    return model


def _set(model, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_checkpoint(src, out, *, bits: int = 4, group_size: int = 128, method: str = "gptq",
                        symmetric: bool = False, calib=None, nsamples: int = 128, seq_len: int = 512,
                        recipe: str | None = None, quantize_head: bool = False, quantize_xdt: bool = False,
                        device=None, tokenizer: str | None = None, seed: int = 0, overwrite: bool = False,
                        options: CalibOptions | None = None, distill=None, report: bool | None = None,
                        report_tokens: int = 4096, log=print) -> dict:
    """Quantize checkpoint ``src`` into native checkpoint ``out``; returns the run record (also in the manifest).

    ``calib``: ``["corpus"]``, ``["full"]`` or text files; ``None``: the shipped train text when the plan needs
    data (GPTQ/AWQ/distillation), else no data. ``report``: router-agreement report (``None``: when data is used).
    ``distill``: a :class:`qmamba.calib.distill.DistillOptions` to distill the binary (1-bit) modules against the
    float model on the calibration sequences after PTB (``None``: no distillation)."""
    from qmamba.checkpoints.files import check_output_dir
    from qmamba.checkpoints.native import read_checkpoint, save_checkpoint
    from qmamba.checkpoints.detect import detect_format
    from qmamba.checkpoints.peek import manifest_of, read_config
    from qmamba.eval import routing_agreement
    from qmamba.model import MambaLM
    from qmamba.tokenizer import TokenizerError, resolve_tokenizer

    src, out = Path(src), Path(out)
    check_output_dir(out, overwrite)
    opts = options or CalibOptions()
    recipe_data = load_recipe(recipe) if recipe else None
    directory, cfg = read_config(src)
    if manifest_of(directory, detect_format(directory)).get("quantization"):  # before reading any weight
        raise UserError(f"{src} is already quantized; quantize its float source instead")
    device = torch.device(device) if device else torch.device("cpu")
    with torch.device("meta"):  # no second copy of the weights: the checkpoint's tensors are assigned
        model = MambaLM(cfg)
    plan = build_plan(model, bits, group_size, symmetric, method, quantize_head, quantize_xdt, recipe_data)
    if distill is not None and not any(getattr(e.fmt, "bits", 0) == 1 for e in plan.values()):
        raise UserError("--distill trains 1-bit modules: use --bits 1 or a recipe with bits: 1")
    calibrates = distill is not None or plan_needs_data(plan) or calib is not None
    want_report = bool(cfg.moe_layer_ids) and (report if report is not None else calibrates)
    try:
        tok = resolve_tokenizer(directory, tokenizer, cfg.vocab_size)
    except TokenizerError as exc:
        if calibrates or want_report or tokenizer is not None:
            raise
        tok = None
        log(f"note: the output will have no tokenizer.json ({exc})")
    n_report = max(1, math.ceil(report_tokens / seq_len))
    data = report_data = None
    if calibrates:
        data = load_calibration(calib or DEFAULT_CALIBRATION, tok, nsamples, seq_len, seed, cfg.vocab_size)
        report_ids = data.ids[:n_report]
    elif want_report:
        report_data = load_calibration(DEFAULT_CALIBRATION, tok, n_report, seq_len, seed, cfg.vocab_size)
        report_ids = report_data.ids

    cfg, state_dict, manifest = read_checkpoint(directory, hash_files=False)  # source_record hashes every file
    source_dtypes = {k: v.dtype for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        state_dict.setdefault("lm_head.weight", state_dict["embedding.weight"])
    model.load_state_dict(state_dict, strict=True, assign=True)  # on the CPU, in the checkpoint's dtypes
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    model.eval().requires_grad_(False)
    del state_dict
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    fp_routes = None
    if want_report:
        fp_routes = record_routing_blockwise(model, report_ids, device, opts.batch_size, opts.progress,
                                             "report: float routing")
    teacher = copy.deepcopy(model) if distill is not None else None  # the float model, before any fold
    results = calibrate(model, data.ids if data is not None else None, plan, opts, device=device)
    apply_packed(model, results)
    distill_report = None
    if teacher is not None:
        from qmamba.calib.distill import distill as run_distillation

        move_module(model, device, torch.float32)  # float parameters in float32; packed tensors as they are
        move_module(teacher, device, torch.float32)
        distill_report = run_distillation(model, teacher, data.ids.to(device), distill, log=log)
        del teacher
        for r in results.values():
            if getattr(r.fmt, "bits", 0) == 1:
                r.method = "ptb+distill"
    router = None
    if want_report:
        routes = record_routing_blockwise(model, report_ids, device, opts.batch_size, opts.progress,
                                          "report: quantized routing")
        router = routing_agreement(fp_routes, routes)
        router["tokens"] = int(report_ids.numel())
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
    info = {"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric,
            "quantize_head": quantize_head, "quantize_xdt": quantize_xdt, "options": asdict(opts),
            "recipe": {"path": str(recipe), "content": recipe_data} if recipe else None,
            "calibration": data.describe() if data is not None else None,
            "report_data": report_data.describe() if report_data is not None else None,
            "device": str(device), "peak_gpu_bytes": peak_gpu,
            "tokenizer": {"origin": tok.origin, "file": str(tok.path)} if tok is not None else None,
            "versions": versions(), "seconds": round(seconds, 2),
            "summary": rows, "router_agreement": router, "distillation": distill_report}
    save_checkpoint(out_sd, cfg, out, source=source_record(directory, manifest), quantization=entries,
                    extra={"quantization_info": info}, tokenizer_file=tok.path if tok is not None else None,
                    overwrite=overwrite)
    return info
