"""What ``qmamba info`` shows: format, layer plan, parameter counts by kind, bytes on disk and by dtype, and a
quantization summary. :func:`checkpoint_summary` returns plain data; :func:`format_summary` renders it.

Nothing here reads tensor data: the config, the manifest and the tensors' names/shapes/dtypes come from
:mod:`qmamba.checkpoints.peek` (safetensors headers, memory-mapped pickles), so describing a 2.8B checkpoint
takes about as long as listing its files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .detect import detect_format, resolve_checkpoint_dir
from .manifest import checkpoint_int8_activations, int8_activation_check
from .peek import config_of, manifest_of, tensor_specs, validate_specs


def compress_layer_plan(codes: list[str]) -> str:
    """``["r", "8"] * 18`` -> ``"(r 8) x 18"``; ``["r"] * 24`` -> ``"r x 24"``; no repeat -> codes joined."""
    n = len(codes)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and codes == codes[:period] * (n // period):
            unit = " ".join(codes[:period])
            return f"({unit}) x {n // period}" if period > 1 else f"{unit} x {n}"
    return " ".join(codes)


def _quantization_summary(quantization: dict | None) -> dict[str, int] | None:
    if not quantization:
        return None
    modules = quantization["modules"] if isinstance(quantization.get("modules"), dict) else quantization
    counts: Counter = Counter()
    for entry in modules.values():
        if isinstance(entry, dict):
            desc = str(entry.get("format", "?"))
            if "group_size" in entry:
                desc += f" g{entry['group_size']}"
            if entry.get("symmetric") is not None:
                desc += " sym" if entry["symmetric"] else " asym"
            if entry.get("method"):
                desc += f" ({entry['method']})"
            counts[desc] += 1
    return dict(counts)


def checkpoint_summary(path) -> dict:
    """Plain-data description of the checkpoint at ``path`` (any supported format)."""
    directory = resolve_checkpoint_dir(path)
    fmt = detect_format(directory)
    cfg = config_of(directory, fmt)
    manifest = manifest_of(directory, fmt)
    specs = tensor_specs(directory, fmt, cfg)
    validate_specs(directory, fmt, cfg, specs, manifest)
    tensors = [t for t in specs if not t.shared]
    by_dtype: Counter = Counter()
    for t in tensors:
        by_dtype[t.dtype] += t.nbytes
    files = {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}
    kinds = cfg.layer_kinds
    return {
        "path": str(directory),
        "format": fmt,
        "family": cfg.family,
        "dims": {"d_model": cfg.d_model, "d_inner": cfg.d_inner, "d_state": cfg.d_state, "d_conv": cfg.d_conv,
                 "dt_rank": cfg.dt_rank, "vocab_size": cfg.vocab_size, "ffn_hidden": cfg.ffn_hidden},
        "n_layers": cfg.n_layers,
        "n_mamba_layers": sum(k == "mamba" for k, _ in kinds),
        "n_moe_layers": sum(k == "moe" for k, _ in kinds),
        "layer_plan": compress_layer_plan(cfg.layers),
        "final_norm": cfg.final_norm,
        "tied_head": cfg.tie_embeddings,
        "parameters": cfg.parameter_counts(),
        "stored_tensors": len(tensors),
        "bytes_by_dtype": dict(by_dtype),
        "bytes_on_disk": sum(files.values()),
        "files": files,
        "quantization": _quantization_summary(manifest.get("quantization")),
        "source": manifest.get("source") if fmt == "qmamba" else None,
        "tokenizer": (Path(directory) / "tokenizer.json").is_file(),
        "int8_activations": int8_activation_check(manifest),
        "int8_prefill_default": checkpoint_int8_activations(manifest),
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def format_summary(s: dict) -> str:
    """Human-readable lines for :func:`checkpoint_summary`'s result."""
    d = s["dims"]
    lines = [
        f"path:        {s['path']}",
        f"format:      {s['format']}   family: {s['family']}   tokenizer.json: {'yes' if s['tokenizer'] else 'no'}",
        f"layers:      {s['n_layers']} ({s['n_mamba_layers']} mamba, {s['n_moe_layers']} moe)   plan: {s['layer_plan']}",
        "dims:        " + ", ".join(f"{k} {v}" for k, v in d.items() if v),
        f"final norm:  {s['final_norm']}   tied head: {s['tied_head']}",
        "parameters:",
    ]
    params = s["parameters"]
    for kind, count in params.items():
        if kind != "total" and count:
            lines.append(f"  {kind:<12} {count:>15,}  ({100 * count / max(params['total'], 1):5.1f}%)")
    lines.append(f"  {'total':<12} {params['total']:>15,}")
    lines.append(f"bytes on disk: {s['bytes_on_disk']:,} ({_human(s['bytes_on_disk'])}) in {len(s['files'])} files")
    lines.append("tensor bytes:  " + ", ".join(f"{k} {v:,} ({_human(v)})" for k, v in s["bytes_by_dtype"].items())
                 + f"   [{s['stored_tensors']} tensors]")
    if s["quantization"]:
        lines.append("quantization:  " + ", ".join(f"{n} x {desc}" for desc, n in s["quantization"].items()))
    else:
        lines.append("quantization:  none")
    check = s.get("int8_activations")
    if isinstance(check, dict) and "kl" in check:
        lines.append(f"int8 prefill:  {'on' if s['int8_prefill_default'] else 'off'} by default (W4A8 "
                     f"experts on CUDA; quantize's check: KL {check['kl']:.2e} nats/token on {check.get('tokens')} "
                     "tokens)")
    if s.get("source"):
        src = s["source"]
        lines.append(f"source:        {src.get('format')} {src.get('path') or ''}".rstrip())
    return "\n".join(lines)
