"""``quantize_checkpoint``: read a float checkpoint, calibrate, quantize, write a native quantized checkpoint.

Output: a native qmamba checkpoint (written atomically by ``save_checkpoint``: a crash or Ctrl-C leaves no output
directory) whose ``manifest["quantization"]`` maps module names to format entries (``{"format": "int4",
"group_size": 128, "symmetric": false, "method": "gptq"}``) and whose ``manifest["quantization_info"]`` records
the run: method and options, recipe, calibration data (source, N, L, sha256 of the token ids), source file
hashes, library versions, the summary table and the router agreement. Non-quantized tensors keep the source's
dtype (AWQ-folded norm/router weights included, so a bf16 source rounds them to bf16).
"""

from __future__ import annotations

import copy
import hashlib
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qmamba.devices import resolve_device
from qmamba.errors import UserError
from qmamba.moe import StackedExperts
from qmamba.quant.modules import experts_class_for, linear_class_for

from qmamba.calib.data import load_calibration, load_tokenizer
from qmamba.calib.pipeline import CalibOptions, ModuleResult, calibrate
from qmamba.calib.recipe import build_plan, load_recipe, resolve_options
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


def quantize_checkpoint(src, out, *, bits: int = 4, group_size: int | None = None, method: str | None = None,
                        symmetric: bool = False, calib=("corpus",), nsamples: int = 128, seq_len: int = 512,
                        recipe: str | None = None, quantize_head: bool = False, quantize_xdt: bool = False,
                        device=None, tokenizer: str | None = None, seed: int = 0, overwrite: bool = False,
                        options: CalibOptions | None = None, distill=None, log=print) -> dict:
    """Quantize checkpoint ``src`` into native checkpoint ``out``; returns the run record (also in the manifest).

    ``group_size`` / ``method`` ``None``: the defaults (128 for int4; GPTQ, PTB for 1-bit); given where they do not
    apply (a method with ``bits=1``, a group size with ``bits=8``) they are a :class:`ConfigError`, checked before
    anything is read. ``distill``: a :class:`qmamba.calib.distill.DistillOptions` to distill the binary (1-bit)
    modules against the float model on the calibration sequences after PTB (``None``: no distillation)."""
    from qmamba.checkpoints.files import check_output_dir
    from qmamba.checkpoints.native import read_checkpoint, save_checkpoint
    from qmamba.eval import record_routing, routing_agreement
    from qmamba.model import MambaLM

    src, out = Path(src), Path(out)
    check_output_dir(out, overwrite)
    opts = options or CalibOptions()
    settings = resolve_options(bits, group_size, method, symmetric, act_order=opts.act_order and not recipe)
    if distill is not None and bits != 1 and not recipe:
        raise UserError(f"--distill trains 1-bit modules: use --bits 1 (not {bits}) or a recipe with bits: 1")
    device = resolve_device(device)
    recipe_data = load_recipe(recipe) if recipe else None
    cfg, state_dict, manifest = read_checkpoint(src)
    if manifest.get("quantization"):
        raise UserError(f"{src} is already quantized; quantize its float source instead")
    directory = src if src.is_dir() else src.parent
    tok_path = Path(tokenizer) if tokenizer else directory / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"no tokenizer for calibration: {tok_path} not found (pass --tokenizer FILE)")

    source_dtypes = {k: v.dtype for k, v in state_dict.items()}
    with torch.device("meta"):  # no second copy of the weights: the float32 tensors are assigned
        model = MambaLM(cfg)
    plan = build_plan(model, bits, group_size, symmetric, method, quantize_head, quantize_xdt, recipe_data)
    if distill is not None and not any(getattr(e.fmt, "bits", 0) == 1 for e in plan.values()):
        raise UserError("--distill trains 1-bit modules: use --bits 1 or a recipe with bits: 1")
    if opts.act_order and not any(e.method == "gptq" for e in plan.values()):
        raise UserError("--act-order applies to GPTQ only, and no module is quantized with GPTQ")
    data = load_calibration(calib, load_tokenizer(tok_path), nsamples, seq_len, seed, cfg.vocab_size)
    sd = {}
    for k in list(state_dict):  # calibration runs in float32
        v = state_dict.pop(k)
        sd[k] = v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
    if cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd["embedding.weight"])
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    model.eval().requires_grad_(False)
    del sd
    ids = data.ids.to(device)

    t0 = time.perf_counter()
    fp_routes = record_routing(model, ids, opts.batch_size)
    teacher = copy.deepcopy(model) if distill is not None else None  # the float model, before any fold
    results = calibrate(model, ids, plan, opts)
    apply_packed(model, results)
    distill_report = None
    if teacher is not None:
        from qmamba.calib.distill import distill as run_distillation

        distill_report = run_distillation(model, teacher, ids, distill, log=log)
        del teacher
        if distill_report["steps"] > 0:  # steps of this run and of a resumed checkpoint
            for r in results.values():
                if getattr(r.fmt, "bits", 0) == 1:
                    r.method = "ptb+distill"
    seconds = time.perf_counter() - t0
    router = routing_agreement(fp_routes, record_routing(model, ids, opts.batch_size))

    bytes_per_param = {}
    for name in results:
        key = name if name.split(".")[-1] in ("fc1", "fc2") else f"{name}.weight"
        dtype = source_dtypes.get(key, source_dtypes.get("embedding.weight", torch.float32))
        bytes_per_param[name] = torch.empty(0, dtype=dtype).element_size()
    rows = summarize(results, bytes_per_param)
    log(format_table(rows, router, seconds))

    entries = {name: r.manifest_entry() for name, r in results.items()}
    out_sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and k in source_dtypes and not any(k.startswith(n + ".") for n in entries):
            v = v.to(source_dtypes[k])
        out_sd[k] = v.detach().cpu()
    info = {**settings,
            "quantize_head": quantize_head, "quantize_xdt": quantize_xdt, "options": asdict(opts),
            "recipe": {"path": str(recipe), "content": recipe_data} if recipe else None,
            "calibration": data.describe(), "versions": versions(), "seconds": round(seconds, 2),
            "summary": rows, "router_agreement": router, "distillation": distill_report}
    save_checkpoint(out_sd, cfg, out, source=source_record(src, manifest), quantization=entries,
                    extra={"quantization_info": info}, tokenizer_file=tok_path, overwrite=overwrite)
    return info
