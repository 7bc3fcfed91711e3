"""ONNX on the GPU: exported models on onnxruntime's CUDA execution provider against qmamba's PyTorch path (tokens
and logits checked, node placement reported) and, side by side, the speed of qmamba's Triton CUDA-graph path.

    python benchmarks/bench_onnx_gpu.py --out DIR [--variants fixture-fp32,big-int4,...] [--phase all|torch|ort]
    python benchmarks/bench_onnx_gpu.py --cpu --quick --out DIR     # dry run: CPU provider, tiny models
    bash scripts/ort_gpu_check.sh DIR [options]                      # the same on the GPU machine, environment set

Variants (``--variants``, see VARIANTS): ``fixture-*`` = the trained fixture (qmamba/assets/tiny-blackmamba);
``mamba-fp32`` = the tiny-mamba preset (no MoE layers: the graph CUDA graphs can capture); ``big-*`` = ``--preset``
(default blackmamba-2.8b) with random weights (seed 0). Formats are RTN-quantized here as in benchmarks/bench_e2e.py:
int4 g128, int8 per channel, 1-bit (binary projections and experts; int4 g128 x_proj/dt_proj/head, exported as
2-bit MatMulNBits); the head is quantized too. ``*-fp32`` exports run fp32 activations and are checked tightly;
the others export fp16 activations (the speed rows) and are checked against the same float32 reference with a
looser tolerance, which they pass if no more positions exceed it than 10% or than the same checkpoint run by
PyTorch in float16 (teacher-forced, reference backend) exceeds it plus 2: fp16 rounding alone can flip a random
model's expert at a near-tie. Quantized exports use ``--accuracy-level`` (default 0: exact).

Phases (both by default; two consecutive calls of a lent GPU machine can split them, ``--work`` persisting):

* torch: per variant, build the model, quantize it, export it (WORK/<variant>/model.onnx), run the PyTorch reference
  path in float32 on the device (greedy tokens after a prompt; logits of every position by one parallel forward),
  and time the Triton path (:func:`qmamba.bench.bench_model`: bf16, CUDA-graph decode; on ``--cpu`` the reference
  path in float32) for the variant's weight format (the big model only, unless ``--triton-all``);
* ort: per exported variant, an onnxruntime session on the CUDA provider (CPU with ``--cpu``), bound through
  IOBinding (:class:`qmamba.export.ort_runner.OrtLM`): node placement (from the profiled first call); the check,
  teacher-forced on the reference's tokens (top-1 at each decode position must agree unless the reference's top
  two are within ``tie`` of its logit range; logits max error / largest |reference logit| within ``tol``); free-
  running greedy tokens compared with the reference's (reported); prefill tokens/s (median of 3) and decode
  ms/token (greedy, argmax on the device); and, for ``--cuda-graph-variants``, onnxruntime's CUDA graph capture of
  the decode step in a subprocess (a failed capture cannot disturb the rest): logits against the uncaptured
  session and decode ms/token.

Writes OUT/onnx_gpu.json and OUT/onnx_gpu.md (after each variant); exits 1 when a check fails or a variant errors.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import require_idle_gpu  # noqa: E402

FIXTURE = REPO / "qmamba" / "assets" / "tiny-blackmamba"
FIXTURE_PROMPT = "The king said that"


@dataclass(frozen=True)
class Variant:
    model: str   # "fixture", "big" (--preset) or a preset name
    fmt: str     # key of formats()
    dtype: str   # export activation dtype
    tol: float   # logits max error / largest |reference logit|, per position
    tie: float   # top-1 disagreement allowed below this share of the reference's logit range
    outliers: float = 0.0  # share of positions allowed beyond tol (fp16 routing can flip an expert at a near-tie)


VARIANTS = {
    "fixture-fp32": Variant("fixture", "float", "fp32", 1e-3, 1e-3),
    "fixture-int4": Variant("fixture", "int4_g128", "fp32", 1e-3, 1e-3),
    "mamba-fp32": Variant("tiny-mamba", "float", "fp32", 1e-3, 1e-3),
    "big-int4-fp32": Variant("big", "int4_g128", "fp32", 1e-3, 1e-3),
    "big-fp16": Variant("big", "float", "fp16", 5e-2, 2e-2, 0.1),
    "big-int4": Variant("big", "int4_g128", "fp16", 5e-2, 2e-2, 0.1),
    "big-int8": Variant("big", "int8", "fp16", 5e-2, 2e-2, 0.1),
    "big-binary": Variant("big", "binary+int4_g128", "fp16", 5e-2, 2e-2, 0.1),
    "big-fp32": Variant("big", "float", "fp32", 1e-3, 1e-3),  # not by default: 4 bytes a weight on disk
}
DEFAULT_VARIANTS = ("fixture-fp32", "fixture-int4", "mamba-fp32", "big-int4-fp32", "big-fp16", "big-int4", "big-int8",
                    "big-binary")
DEFAULT_GRAPH_VARIANTS = ("fixture-fp32", "mamba-fp32", "big-int4")


def formats() -> dict:
    """name -> (format of the projections and experts, format of x_proj / dt_proj / head or None for the same)."""
    from qmamba.quant.binary import BinaryFormat
    from qmamba.quant.formats import Int4Format, Int8Format

    return {"float": (None, None), "int8": (Int8Format(), None), "int4_g128": (Int4Format(128), None),
            "binary+int4_g128": (BinaryFormat(), Int4Format(128))}


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- torch phase ------------------------------------------------------------------------------------------
def build_model(variant: Variant, args, device: torch.device, dtype: torch.dtype):
    """``(cfg, model)``: the variant's model on ``device`` in ``dtype``, quantized to its format (RTN)."""
    from qmamba.checkpoints.detect import read_checkpoint
    from qmamba.checkpoints.load import build_model as load
    from qmamba.config import preset
    from qmamba.testing import quantize_rtn, random_model

    if variant.model == "fixture":
        cfg, sd, manifest = read_checkpoint(FIXTURE, hash_files=False)
        model = load(cfg, dict(sd), manifest, device, dtype)
    else:
        cfg = preset(args.preset if variant.model == "big" else variant.model)
        model = random_model(cfg, device, dtype)
    fmt, sensitive = formats()[variant.fmt]
    if fmt is not None:
        quantize_rtn(model, fmt, head=True, sensitive_fmt=sensitive)
    return cfg, model.requires_grad_(False)


def quant_manifest(model) -> dict:
    """The manifest entries of the quantized modules of ``model`` (what ``qmamba quantize`` would write)."""
    from qmamba.quant.modules import PackedExpertWeight, QuantLinear

    entries = {name: mod.fmt.to_dict() for name, mod in model.named_modules()
               if isinstance(mod, (QuantLinear, PackedExpertWeight))}
    return {"quantization": entries} if entries else {}


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def reference_prompt(variant: Variant, cfg, args) -> torch.Tensor:
    if variant.model == "fixture":
        from qmamba.tokenizer import load_tokenizer

        return torch.tensor([load_tokenizer(FIXTURE / "tokenizer.json").encode(FIXTURE_PROMPT)], dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (1, args.check_prompt), generator=gen)


@torch.no_grad()
def torch_phase(name: str, variant: Variant, args, device: torch.device, work: Path, triton_rows: dict) -> dict:
    """Export + reference + Triton timing of one variant (see module doc); returns its record."""
    from qmamba.export.exporter import export_model
    from qmamba.export.graph import ExportOptions
    from qmamba.generation import generate

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg, model = build_model(variant, args, device, torch.float32)
    model.set_backend("reference")
    record = {"model": args.preset if variant.model == "big" else variant.model, "format": variant.fmt,
              "export_dtype": variant.dtype, "d_model": cfg.d_model, "layers": len(cfg.layers),
              "vocab": cfg.vocab_size}
    manifest = quant_manifest(model)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    half_twin = variant.dtype == "fp16"  # the same checkpoint in float16: how far fp16 activations alone stray
    options = ExportOptions(dtype=variant.dtype, accuracy_level=args.accuracy_level)
    t1 = time.perf_counter()
    summary = export_model(cfg, state_dict, manifest, folder / "model.onnx", options, overwrite=True)
    if not half_twin:
        del state_dict
    record.update(export_s=round(time.perf_counter() - t1, 1), onnx_bytes=summary.file_bytes,
                  onnx_ops=summary.ops, accuracy_level=args.accuracy_level)
    prompt = reference_prompt(variant, cfg, args).to(device)
    tokens = generate(model, prompt, args.check_tokens, temperature=0)            # the step path
    logits, _ = model.prefill(tokens[:, :-1], check=False)                       # one parallel forward
    reference = {"prompt_len": prompt.shape[1], "tokens": tokens.cpu(), "logits": logits.float().cpu()}
    if half_twin:
        del model, logits
        free_memory()
        from qmamba.checkpoints.load import build_model as load

        model = load(cfg, state_dict, manifest, device, torch.float16).requires_grad_(False)
        model.set_backend("reference")
        del state_dict
        logits, _ = model.prefill(tokens[:, :-1], check=False)
        reference["logits_half"] = logits.float().cpu()
    torch.save(reference, folder / "reference.pt")
    record["reference"] = f"PyTorch reference backend, float32, {device.type}"
    record["torch_s"] = round(time.perf_counter() - t0, 1)
    del model, logits
    free_memory()
    key = (record["model"], variant.fmt)
    wanted = not args.no_triton and (variant.model == "big" or args.triton_all)
    if key not in triton_rows and wanted:
        triton_rows[key] = time_triton(variant, args, device)
    record["triton"] = triton_rows.get(key)
    return record


def time_triton(variant: Variant, args, device: torch.device) -> dict:
    """qmamba's own path for the variant's format: on CUDA the Triton backend in bf16 with the CUDA-graph decode
    (what ``qmamba bench`` measures); on CPU the reference backend in float32."""
    from qmamba.bench import bench_model, weight_bytes

    cuda = device.type == "cuda"
    try:
        _, model = build_model(variant, args, device, torch.bfloat16 if cuda else torch.float32)
        model.set_backend("triton" if cuda else "reference")
        row = bench_model(model, [1], args.prompt_len, args.tokens, check_tokens=0)[0]
        out = {"path": row.path, "dtype": row.dtype, "weights": row.weights, "prefill_tok_s": row.prefill_tok_s,
               "decode_ms": row.decode_ms_per_token, "weight_bytes": weight_bytes(model)}
        del model
    except Exception as exc:  # noqa: BLE001 - reported in the table, the ONNX rows still count
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    free_memory()
    return out


# ---- ort phase --------------------------------------------------------------------------------------------
def check_against_reference(lm, ref: dict, variant: Variant) -> dict:
    """Teacher-forced comparison on the reference's tokens, and free-running greedy tokens (see module doc)."""
    from qmamba.export.ort_runner import generate_onnx

    tokens, p = ref["tokens"], ref["prompt_len"]
    n = tokens.shape[1] - p
    logits, state = lm.prefill(tokens[:, :p])
    steps = [lm.step(tokens[:, p + i], state) for i in range(n - 1)]
    got = torch.cat([logits.cpu()] + [s.cpu()[:, None] for s in steps], 1).float()     # [1, p + n - 1, V]
    stats = logits_agreement(got, ref["logits"], p, variant)
    free = generate_onnx(lm, tokens[:, :p], n, temperature=0).cpu()
    diverge = (free != tokens).nonzero()
    first = int(diverge[0, 1]) - p if len(diverge) else None
    half = logits_agreement(ref["logits_half"], ref["logits"], p, variant) if "logits_half" in ref else None
    ok, allowed = check_passes(stats, half, variant)
    return {"ok": ok, **stats, "tol": variant.tol, "outliers_allowed": variant.outliers,
            "positions_allowed_beyond_tol": allowed, "tie": variant.tie, "greedy_tokens_equal": first is None,
            "greedy_first_divergence": first, "torch_half": half}


def check_passes(stats: dict, half: dict | None, variant: Variant) -> tuple[bool, float]:
    """``(ok, positions allowed beyond tol)``: no top-1 difference beyond a tie, and at most ``variant.outliers`` of
    the positions beyond ``variant.tol``, or (fp16 exports, ``half`` = the PyTorch float16 twin's agreement) at most
    as many as that twin plus 2: the export is then as close to float32 as fp16 activations let PyTorch be."""
    allowed = variant.outliers * stats["positions"]
    if half is not None:
        allowed = max(allowed, half["positions_beyond_tol"] + 2)
    return stats["positions_beyond_tol"] <= allowed and stats["top1_mismatches_beyond_ties"] == 0, allowed


def logits_agreement(got: torch.Tensor, want: torch.Tensor, prompt_len: int, variant: Variant) -> dict:
    """How far teacher-forced logits ``got [1, T, V]`` are from the float32 reference's ``want``: per position the
    max error over the largest |reference logit| (max, median, positions beyond ``variant.tol``) and the decode
    positions whose argmax differs (all of them, and those beyond a rounding-level tie)."""
    per_position = ((got - want).abs().amax(-1) / want.abs().max().clamp_min(1e-12))[0]   # [T]
    decode_got, decode_want = got[:, prompt_len - 1:], want[:, prompt_len - 1:]
    top_got, top_want = decode_got.argmax(-1), decode_want.argmax(-1)
    span = (decode_want.amax(-1) - decode_want.amin(-1)).clamp_min(1e-6)
    gap = (decode_want.gather(-1, top_want[..., None]) - decode_want.gather(-1, top_got[..., None]))[..., 0] / span
    mismatch = top_got != top_want
    return {"logits_rel_err": float(per_position.max()), "logits_rel_err_median": float(per_position.median()),
            "positions": int(per_position.numel()), "positions_beyond_tol": int((per_position > variant.tol).sum()),
            "decode_positions": int(top_want.numel()), "top1_mismatches": int(mismatch.sum()),
            "top1_mismatches_beyond_ties": int((mismatch & (gap > variant.tie)).sum())}


def time_ort(lm, vocab: int, args) -> dict:
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(2))
    head = min(16, ids.shape[1])
    lm.prefill(ids[:, :head])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lm.prefill(ids)
        sync(lm.device)
        times.append(time.perf_counter() - t0)
    _, state = lm.prefill(ids[:, :head])
    tok = ids[:, head - 1].to(lm.device)
    for _ in range(3):  # warm-up
        tok = lm.step(tok, state).argmax(-1)
    sync(lm.device)
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        tok = lm.step(tok, state).argmax(-1)
    sync(lm.device)
    return {"prefill_tok_s": ids.numel() / statistics.median(times),
            "decode_ms": (time.perf_counter() - t0) * 1e3 / args.tokens}


def cuda_graph_probe(path: Path, args) -> dict:
    """Run :func:`graph_probe_main` in a subprocess; its JSON line, or the failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--graph-probe", str(path), "--tokens", str(args.tokens),
           "--device", args.device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.graph_timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.graph_timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"exit {proc.returncode}: {tail[:300]}"}


def graph_probe_main(path: str, device: str, tokens: int) -> None:
    """(subprocess) CUDA graph capture of the decode step: 8 steps against an uncaptured session, then timing."""
    from qmamba.export.ort_runner import OrtLM

    result = {"ok": False}
    try:
        plain = OrtLM(path, device=device, warn=None, placement=False)
        graph = OrtLM(path, device=device, warn=None, placement=False, cuda_graph=True)
        ids = torch.randint(0, plain.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
        _, s_plain = plain.prefill(ids)
        _, s_graph = graph.prefill(ids)
        tok, diffs = ids[:, -1], []
        for _ in range(8):  # onnxruntime runs a few steps uncaptured, then captures, then replays
            want = plain.step(tok, s_plain)
            diffs.append(rel_err(graph.step(tok, s_graph), want))
            tok = want.argmax(-1)
        tok = tok.to(graph.device)
        sync(graph.device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = graph.step(tok, s_graph).argmax(-1)
        sync(graph.device)
        result = {"ok": max(diffs) <= 1e-3, "max_rel_err_vs_uncaptured": max(diffs),
                  "decode_ms": (time.perf_counter() - t0) * 1e3 / tokens}
    except Exception as exc:  # noqa: BLE001 - the report is the point
        result = {"ok": False, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    print(json.dumps(result), flush=True)


def ort_phase(name: str, variant: Variant, args, work: Path, record: dict) -> dict:
    from qmamba.export.ort_runner import OrtLM

    folder = work / name
    path = folder / "model.onnx"
    ref = torch.load(folder / "reference.pt")
    t0 = time.perf_counter()
    lm = OrtLM(path, device=args.device, threads=args.threads, warn=None, placement=True)
    record["session_s"] = round(time.perf_counter() - t0, 1)
    record["provider"] = lm.provider
    record["onnx_bytes"] = file_bytes(path)
    record["check"] = check_against_reference(lm, ref, variant)
    record["placement"] = lm.placement.as_dict() if lm.placement else None
    record["nodes_off_provider"] = lm.placement.elsewhere(lm.provider) if lm.placement else None
    record["ort"] = time_ort(lm, lm.vocab_size, args)
    del lm
    free_memory()
    if name in args.cuda_graph_variants:
        record["cuda_graph"] = cuda_graph_probe(path, args)
    return record


# ---- report -----------------------------------------------------------------------------------------------
def fmt_num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# ONNX on the GPU: onnxruntime CUDA provider vs qmamba's Triton path",
        "",
        f"Device: {env['device']}; onnxruntime {env['onnxruntime']} (providers used: {env['provider']}); torch "
        f"{env['torch']}. Batch 1; prefill = one {result['args']['prompt_len']}-token prompt (median of 3); decode "
        f"= {result['args']['tokens']} greedy steps. ONNX quantized exports: MatMulNBits accuracy_level "
        f"{result['args']['accuracy_level']}.",
        f"Command: `{result['command']}`",
        "",
        "| variant | model | weights | ONNX act. | ONNX MiB | ORT prefill tok/s | ORT decode ms/tok | "
        "ORT CUDA graph ms/tok | ours prefill tok/s | ours decode ms/tok | ours MiB | check | nodes off provider |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in result["variants"].items():
        if "error" in r and "ort" not in r:
            lines.append(f"| {name} | {r.get('model', '-')} | {r.get('format', '-')} | {r.get('export_dtype', '-')} "
                         f"| - | - | - | - | - | - | - | ERROR: {r['error'][:120]} | - |")
            continue
        ort, tri, chk = r.get("ort") or {}, r.get("triton") or {}, r.get("check") or {}
        graph = r.get("cuda_graph")
        graph_cell = "-" if graph is None else (fmt_num(graph.get("decode_ms"), ".3f") if graph.get("ok")
                                                else "failed")
        check = "-" if not chk else ("ok" if chk["ok"] else "FAILED") + (
            f" (err max {chk['logits_rel_err']:.1e} median {chk['logits_rel_err_median']:.1e}, "
            f"{chk['positions_beyond_tol']}/{chk['positions']} positions > {chk['tol']:g}, "
            f"top-1 {chk['top1_mismatches']}/{chk['decode_positions']} off, "
            f"greedy {'equal' if chk['greedy_tokens_equal'] else 'diverges at ' + str(chk['greedy_first_divergence'])}"
            + ("" if not chk.get("torch_half") else
               f"; PyTorch float16: err max {chk['torch_half']['logits_rel_err']:.1e} median "
               f"{chk['torch_half']['logits_rel_err_median']:.1e}, {chk['torch_half']['positions_beyond_tol']}/"
               f"{chk['torch_half']['positions']} > {chk['tol']:g}")
            + ")")
        off = r.get("nodes_off_provider")
        off_cell = "-" if off is None else (", ".join(f"{op} x{n}" for op, n in off.items()) or "none")
        lines.append(
            f"| {name} | {r['model']} | {r['format']} | {r['export_dtype']} | {r['onnx_bytes'] / 2**20:,.1f} | "
            f"{fmt_num(ort.get('prefill_tok_s'), ',.0f')} | {fmt_num(ort.get('decode_ms'), '.3f')} | {graph_cell} | "
            f"{fmt_num(tri.get('prefill_tok_s'), ',.0f')} | {fmt_num(tri.get('decode_ms'), '.3f')} | "
            f"{fmt_num(tri['weight_bytes'] / 2**20 if tri.get('weight_bytes') else None, ',.1f')} | {check} | "
            f"{off_cell} |")
    lines += ["", "'ours' = qmamba's own path for the same weight format: on CUDA the Triton backend in bf16 with the "
              "CUDA-graph decode (`qmamba bench`), on CPU the PyTorch reference path in float32. ONNX MiB = .onnx "
              "+ .data; ours MiB = weight tensors in memory.",
              "Check: teacher-forced on the PyTorch float32 reference's greedy tokens; err = a position's logits "
              "max error / largest |reference logit| (fp16 rows may exceed the tolerance at up to 10% of the "
              "positions, or at as many as the same checkpoint run by PyTorch in float16 plus 2: an expert flipped "
              "at a near-tie); top-1 off = decode positions whose argmax differs "
              "(allowed only at rounding-level ties); 'greedy' = free-running ORT greedy tokens vs the reference's."]
    ours = sorted({f"{r['triton'].get('path')} {r['triton'].get('dtype')}" for r in result["variants"].values()
                   if (r.get("triton") or {}).get("path")})
    if ours:
        lines.append("'ours' ran: " + "; ".join(ours) + ".")
    graphs = {n: r["cuda_graph"] for n, r in result["variants"].items() if r.get("cuda_graph")}
    if graphs:
        lines += ["", "CUDA graph capture of the decode step (onnxruntime `enable_cuda_graph`, subprocess):"]
        lines += [f"- {n}: " + (f"ok, {g['decode_ms']:.3f} ms/token, max rel err vs uncaptured "
                                f"{g['max_rel_err_vs_uncaptured']:.1e}" if g.get("ok") else
                                f"failed: {g.get('error', g)}") for n, g in graphs.items()]
    placements = {n: r["placement"] for n, r in result["variants"].items() if r.get("placement")}
    if placements:
        lines += ["", "Node placement (nodes run in the first call, by provider and op):"]
        for n, pl in placements.items():
            per = "; ".join(f"{p}: " + ", ".join(f"{op} x{c}" for op, c in ops.items())
                            for p, ops in pl["nodes"].items())
            lines.append(f"- {n}: {per}; host<->device copies per call: {pl['copies']}")
    if result["failures"] or result["skipped"]:
        lines += [""] + [f"- FAILED {f}" for f in result["failures"]] + [f"- skipped {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def environment(args) -> dict:
    import onnxruntime

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or "cpu")
    return {"device": device, "onnxruntime": onnxruntime.__version__, "onnxruntime_file": onnxruntime.__file__,
            "available_providers": onnxruntime.get_available_providers(), "torch": torch.__version__,
            "provider": "CUDAExecutionProvider" if args.device.startswith("cuda") else "CPUExecutionProvider"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for onnx_gpu.json and onnx_gpu.md")
    ap.add_argument("--work", default=None, help="exports and references (default: /tmp/qmamba-onnx-gpu)")
    ap.add_argument("--phase", choices=("all", "torch", "ort"), default="all")
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--cuda-graph-variants", default=None,
                    help="variants whose decode CUDA graph capture is tried (default "
                         f"{','.join(DEFAULT_GRAPH_VARIANTS)}; 'none' for none)")
    ap.add_argument("--preset", default="blackmamba-2.8b", help="the 'big' model (random weights)")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU provider (no GPU needed)")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny-blackmamba as the big model, short prompts")
    ap.add_argument("--prompt-len", type=int, default=None, help="prefill timing prompt (default 512; quick 32)")
    ap.add_argument("--tokens", type=int, default=None, help="decode timing steps (default 128; quick 8)")
    ap.add_argument("--check-prompt", type=int, default=32, help="prompt length of the check (random models)")
    ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens of the check")
    ap.add_argument("--accuracy-level", type=int, default=0, choices=range(5))
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (CPU)")
    ap.add_argument("--budget-s", type=float, default=480, help="start no variant after this many seconds")
    ap.add_argument("--graph-timeout", type=int, default=180)
    ap.add_argument("--no-triton", action="store_true", help="skip timing qmamba's own path")
    ap.add_argument("--triton-all", action="store_true",
                    help="time qmamba's own path for the fixture and tiny-mamba too (default: the big model only)")
    ap.add_argument("--graph-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.cpu else "cuda")
    if args.quick:
        args.preset = "tiny-blackmamba" if args.preset == "blackmamba-2.8b" else args.preset
    args.prompt_len = args.prompt_len or (32 if args.quick else 512)
    args.tokens = args.tokens or (8 if args.quick else 128)
    names = (args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.variant_names = names
    graph = args.cuda_graph_variants
    args.cuda_graph_variants = [] if graph == "none" else (graph.split(",") if graph else list(DEFAULT_GRAPH_VARIANTS))
    if args.graph_probe is None and not args.out:
        ap.error("--out is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.graph_probe:
        graph_probe_main(args.graph_probe, args.device, args.tokens)
        return 0
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        require_idle_gpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or "/tmp/qmamba-onnx-gpu")
    work.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda" and args.phase != "torch":  # the torch phase needs no onnxruntime-gpu
        import onnxruntime

        from qmamba.errors import UserError
        from qmamba.export.ort_providers import session_providers

        try:
            session_providers(onnxruntime, args.device)  # before any work
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    state_file = work / "torch_phase.json"
    records = json.loads(state_file.read_text()) if args.phase == "ort" and state_file.is_file() else {}
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "environment": environment(args),
              "args": {k: v for k, v in vars(args).items() if k not in ("graph_probe",)}, "variants": {},
              "failures": [], "skipped": []}

    def save():
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        (out / "onnx_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "onnx_gpu.md").write_text(markdown(result))

    triton_rows: dict = {}
    for name in args.variant_names:
        variant = VARIANTS[name]
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append(f"{name}: time budget ({args.budget_s:.0f} s) spent")
            continue
        record = records.get(name, {})
        t0 = time.perf_counter()
        try:
            if args.phase in ("all", "torch"):
                record = torch_phase(name, variant, args, device, work, triton_rows)
                records[name] = record
                state_file.write_text(json.dumps(records, indent=1, default=str))
            if args.phase == "ort" and record.get("error"):
                raise RuntimeError(f"torch phase: {record['error']}")
            if args.phase == "ort" and not (work / name / "reference.pt").is_file():
                result["skipped"].append(f"{name}: no export in {work} (the torch phase did not reach it)")
                continue
            if args.phase in ("all", "ort"):
                record = ort_phase(name, variant, args, work, record)
                if not record["check"]["ok"]:
                    result["failures"].append(f"{name}: check {record['check']}")
                graph = record.get("cuda_graph")
                if graph is not None and graph.get("error") is None and not graph.get("ok"):
                    result["failures"].append(f"{name}: CUDA graph replay differs from the uncaptured session")
        except Exception as exc:  # noqa: BLE001 - one variant's failure is reported, the others still run
            message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            record = {**asdict(variant), **record, "error": message,
                      "model": record.get("model", variant.model), "format": variant.fmt,
                      "export_dtype": variant.dtype}
            result["failures"].append(f"{name}: {message}")
            traceback.print_exc()
        record["variant_s"] = round(time.perf_counter() - t0, 1)
        result["variants"][name] = record
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: " + json.dumps(
            {k: record.get(k) for k in ("check", "ort", "triton", "cuda_graph", "error") if k in record},
            default=str), flush=True)
        save()
        free_memory()
    save()
    print(markdown(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
