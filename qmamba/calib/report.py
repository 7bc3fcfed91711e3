"""The summary of a quantization run: per module kind, bits, bytes before/after, output SQNR, expert fallbacks,
router agreement. Used for the CLI table and stored (as a dict) in the checkpoint manifest."""

from __future__ import annotations

import math
from collections import OrderedDict

from qmamba.calib.pipeline import ModuleResult


def _bytes(packed: dict) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def summarize(results: dict[str, ModuleResult], source_bytes_per_param: dict[str, int]) -> list[dict]:
    """One row per (module kind, format, method); ``source_bytes_per_param`` maps module name -> bytes/param."""
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, r in results.items():
        key = (r.kind, r.fmt.describe(), r.method)
        row = rows.setdefault(key, {"kind": r.kind, "format": r.fmt.describe(), "bits": r.fmt.bits,
                                    "method": r.method, "modules": 0, "params": 0, "bytes_before": 0,
                                    "bytes_after": 0, "signal": 0.0, "noise": 0.0, "fallbacks": [], "notes": []})
        row["modules"] += 1
        row["params"] += r.n_params
        row["bytes_before"] += r.n_params * source_bytes_per_param.get(name, 4)
        row["bytes_after"] += _bytes(r.packed)
        row["signal"] += r.signal
        row["noise"] += r.noise
        row["fallbacks"] += [f"{name}[{e}]:{how}" for e, how in sorted(r.fallbacks.items(), key=str)]
        row["notes"] += [f"{name}: {n}" for n in r.notes]
    out = []
    for row in rows.values():
        signal, noise = row.pop("signal"), row.pop("noise")
        row["sqnr_db"] = round(10 * math.log10(signal / noise), 2) if noise > 0 and signal > 0 else None
        row["bits_per_weight"] = round(8 * row["bytes_after"] / row["params"], 3) if row["params"] else None
        out.append(row)
    return out


MAX_FALLBACK_LINES = 8


def format_fallbacks(fallbacks: list[str], max_lines: int = MAX_FALLBACK_LINES) -> list[str]:
    """Short lines for ``"module[expert]:how"`` fallback records: a count, then one line per module (at most
    ``max_lines``; the full list is in the manifest's ``quantization_info.summary``)."""
    by_module: "OrderedDict[str, OrderedDict[str, list[str]]]" = OrderedDict()
    for item in fallbacks:
        where, _, how = item.rpartition(":")
        module, _, expert = where.partition("[")
        by_module.setdefault(module, OrderedDict()).setdefault(how, []).append(expert.rstrip("]"))
    kinds = OrderedDict()
    for hows in by_module.values():
        for how, experts in hows.items():
            kinds[how] = kinds.get(how, 0) + len(experts)
    lines = [f"fallbacks: {len(fallbacks)} ({', '.join(f'{how} {n}' for how, n in kinds.items())}) in "
             f"{len(by_module)} module(s):"]
    for module, hows in list(by_module.items())[:max_lines]:
        parts = [how + ("" if experts == ["-"] else " for expert(s) " + ", ".join(experts))
                 for how, experts in hows.items()]
        lines.append(f"  {module}: {'; '.join(parts)}")
    if len(by_module) > max_lines:
        lines.append(f"  ... and {len(by_module) - max_lines} more module(s), all listed in the manifest "
                     "(quantization_info.summary)")
    return lines


def format_table(rows: list[dict], router: dict | None = None, seconds: float | None = None) -> str:
    """A plain-text table of :func:`summarize` rows."""
    header = ("kind", "format", "method", "mods", "bits/w", "MiB before", "MiB after", "SQNR dB", "fallbacks")
    lines = [header]
    for r in rows:
        lines.append((r["kind"], r["format"], r["method"], str(r["modules"]), f"{r['bits_per_weight']:.2f}",
                      f"{r['bytes_before'] / 2**20:.3f}", f"{r['bytes_after'] / 2**20:.3f}",
                      "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}", str(len(r["fallbacks"]))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    text.append(f"quantized weights: {before / 2**20:.3f} MiB -> {after / 2**20:.3f} MiB "
                f"({before / after:.2f}x)" if after else "")
    fallbacks = [f for r in rows for f in r["fallbacks"]]
    if fallbacks:
        text += format_fallbacks(fallbacks)
    if router and router.get("per_layer"):
        per = ", ".join(f"L{i}: {100 * a:.1f}%" for i, a in router["per_layer"].items())
        text.append(f"router top-1 agreement with the float model (calibration tokens): "
                    f"{100 * router['overall']:.2f}% ({per})")
    if seconds is not None:
        text.append(f"calibration + quantization time: {seconds:.1f} s")
    return "\n".join(text)
