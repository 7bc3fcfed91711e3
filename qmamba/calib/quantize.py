"""``quantize_checkpoint(src, out, QuantizeOptions(...))``: read a float checkpoint (the one reader and builder of
:mod:`qmamba.checkpoints`), calibrate, quantize, swap in the quantized modules, write a native quantized checkpoint.

Output: a native qmamba checkpoint (written atomically by ``save_checkpoint``: a crash or Ctrl-C leaves no output
directory) whose ``manifest["quantization"]`` maps module names to format entries (``{"format": "int4",
"group_size": 128, "symmetric": false, "method": "gptq"}``) and whose ``manifest["quantization_info"]`` records
the run: method and options, recipe, calibration data (source, N, L, sha256 of the token ids), source file
hashes, library versions, the summary table and the router agreement. Non-quantized tensors keep the source's
dtype (AWQ-folded norm/router weights included, so a bf16 source rounds them to bf16).
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qmamba.checkpoints.files import hash_files
from qmamba.errors import UserError
from qmamba.quant.modules import swap_quantized_modules

from qmamba.calib.data import load_calibration, load_tokenizer
from qmamba.calib.pipeline import CalibOptions, calibrate
from qmamba.calib.recipe import build_plan, load_recipe
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
    ``quantize_xdt``); a ``recipe`` file overrides them per module. ``calib``: ``"corpus"`` or text files, cut into
    ``nsamples`` windows of ``seq_len`` tokens (corpus windows drawn with ``seed``). ``tokenizer``: default the
    checkpoint's ``tokenizer.json``. ``calibration``: the walk's own settings. ``distill``: a
    :class:`qmamba.calib.distill.DistillOptions` to distill the 1-bit modules against the float model after PTB.
    """

    bits: int = 4
    group_size: int = 128
    method: str = "gptq"
    symmetric: bool = False
    calib: Sequence[str] = ("corpus",)
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


def quantize_checkpoint(src, out, options: QuantizeOptions | None = None, *, log=print) -> dict:
    """Quantize checkpoint ``src`` into native checkpoint ``out`` as ``options`` say; returns the run record (also
    in the manifest)."""
    from qmamba.checkpoints.files import check_output_dir
    from qmamba.checkpoints.detect import open_checkpoint
    from qmamba.checkpoints.load import model_from_checkpoint
    from qmamba.checkpoints.native import save_checkpoint
    from qmamba.eval import record_routing, routing_agreement

    options = options or QuantizeOptions()
    src, out = Path(src), Path(out)
    check_output_dir(out, options.overwrite)
    opts, distill, recipe = options.calibration, options.distill, options.recipe
    recipe_data = load_recipe(recipe) if recipe else None
    checkpoint = open_checkpoint(src, hash_files=True)
    cfg, manifest = checkpoint.config, checkpoint.manifest
    if manifest.get("quantization"):
        raise UserError(f"{src} is already quantized; quantize its float source instead")
    directory = src if src.is_dir() else src.parent
    tok_path = Path(options.tokenizer) if options.tokenizer else directory / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"no tokenizer for calibration: {tok_path} not found (pass --tokenizer FILE)")
    device = torch.device(options.device) if options.device else torch.device("cpu")

    source_dtypes = {k: v.dtype for k, v in checkpoint.state_dict.items()}
    plan = build_plan(checkpoint.skeleton, options.bits, options.group_size, options.symmetric, options.method,
                      options.quantize_head, options.quantize_xdt, recipe_data)
    if distill is not None and not any(getattr(e.fmt, "bits", 0) == 1 for e in plan.values()):
        raise UserError("--distill trains 1-bit modules: use --bits 1 or a recipe with bits: 1")
    data = load_calibration(options.calib, load_tokenizer(tok_path), options.nsamples, options.seq_len,
                            options.seed, cfg.vocab_size)
    model = model_from_checkpoint(checkpoint, device, torch.float32)  # calibration runs in float32
    ids = data.ids.to(device)

    t0 = time.perf_counter()
    fp_routes = record_routing(model, ids, opts.batch_size)
    teacher = copy.deepcopy(model) if distill is not None else None  # the float model, before any fold
    results = calibrate(model, ids, plan, opts)
    swap_quantized_modules(model, {name: r.fmt for name, r in results.items()},
                           {name: r.packed for name, r in results.items()})
    distill_report = None
    if teacher is not None:
        from qmamba.calib.distill import distill as run_distillation

        distill_report = run_distillation(model, teacher, ids, distill, log=log)
        del teacher
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
    info = {"method": options.method, "bits": options.bits, "group_size": options.group_size,
            "symmetric": options.symmetric, "quantize_head": options.quantize_head,
            "quantize_xdt": options.quantize_xdt, "options": asdict(opts),
            "recipe": {"path": str(recipe), "content": recipe_data} if recipe else None,
            "calibration": data.describe(), "versions": versions(), "seconds": round(seconds, 2),
            "summary": rows, "router_agreement": router, "distillation": distill_report}
    save_checkpoint(out_sd, cfg, out, source=source_record(src, manifest), quantization=entries,
                    extra={"quantization_info": info}, tokenizer_file=tok_path, overwrite=options.overwrite)
    return info
