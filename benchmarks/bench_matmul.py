"""Issue 13's table: one matrix of each BlackMamba-2.8B projection shape in int4 g128, run the way the runtime runs
it, beside cuBLAS bf16 (and the 4-bit peers where they are installed), from 1 to 2048 input rows; every output is
checked before it is timed.

    python benchmarks/bench_matmul.py --json m.json                 # GPU: M = 1,2,4,8,16,64,256,2048, five shapes
    python benchmarks/bench_matmul.py --json m.json --m 8,2048 --shapes fc1,fc2 --peers "" --experts
    TRITON_INTERPRET=1 python benchmarks/bench_matmul.py --quick --json q.json   # CPU smoke: tiny shapes, checks only

Methods (``--peers`` picks the last two; ``--experts`` adds the routed expert stacks):

* ``cublas_bf16``: ``F.linear`` on the bf16 weight.
* ``int4_g128``: RTN int4, group 128, held as plane words (as ``load_model`` holds int4 on CUDA), dispatched as the
  runtime does: 1 row, the decode kernel as the fused step launches it (the device's ``DecodePolicy``, the input
  as the int4 input planes that the step's add + norm writes); 2-16 rows, :func:`dequant_matmul`'s small-M kernel
  (batched decode's dense projections) into a float32 output made outside the timed call, as the fused step hands
  it a view of its workspace (zeroed by one memset a token for all its matrices: split-K adds into it); from 17
  rows, one dequantization pass then cuBLAS (the prefill).
* ``torch_int4``: torch's tinygemm kernel (``_weight_int4pack_mm``) on the same codes, scales and zero points.
* ``bnb_nf4``: bitsandbytes NF4 (block 64) of the same float weight.
* ``--small-m-tiles 16x32k1w4s3,...``: candidates for the dense projections at 2-16 rows, ``int4_sm_<tile>``: the
  small-M kernel on the same plane words with that tile (rows x weight rows, split-K, warps, stages) into a
  float32 output made outside the timed call, as ``int4_g128`` is there (which is the runtime's own tile). Timed
  only at 2-16 rows.
* ``--experts``: ``fc1 x8`` / ``fc2 x8``, a stack of 8 experts with random top-1 routing, in int4 g128 and in bf16,
  both on our kernels as a BlackMamba step runs them (1-8 rows: the decode kernel's routed row programs; 16 rows:
  the small-M kernel into a workspace; from 17 rows: the grouped GEMM over the expert tile map).

Check (before timing, outputs of fresh calls): ``||y - y_ref|| / ||y_ref|| < 1e-2`` against ``x @ W_ref^T`` in
float32, where ``W_ref`` is exactly what the method computes with (the bf16 weight, the int4 or NF4 dequantized
weight). A method that cannot run here (a peer not installed, an API this torch lacks) is reported unavailable; a
method that runs and fails its check is a failure: the script then exits 1 after the table. Timing:
benchmarks/timing.py (CUDA-graph replay of one call per node over rotating weight copies past 2x L2, median).
Speedup = cuBLAS bf16 time / int4 time, against issue 13's targets (>= 1.5x at M = 2..16, >= 1.0x at 64..256,
>= 0.95x at 2048).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_linear import clones  # noqa: E402
from timing import EAGER_FALLBACKS, copies_for, time_calls, require_idle_gpu  # noqa: E402

from qmamba.kernels.decode_linear import decode_linear  # noqa: E402
from qmamba.kernels.decode_policy import DecodePolicy  # noqa: E402
from qmamba.kernels.matmul_configs import GEMV_MAX_M, MatmulConfig  # noqa: E402
from qmamba.kernels.quant_matmul import dequant_matmul  # noqa: E402
from qmamba.kernels.weights import PackedWeight  # noqa: E402
from qmamba.quant.formats import Int4Format  # noqa: E402
from qmamba.quant.layout import int4_x_planes  # noqa: E402

# name -> (K, N): BlackMamba-2.8B's projections (issue 13's list); --quick: small stand-ins, ragged K included
SHAPES = {"in_proj": (1472, 5888), "out_proj": (2944, 1472), "fc1": (1472, 7744), "fc2": (3872, 1472),
          "head": (1472, 50304)}
QUICK_SHAPES = {"in_proj": (200, 96), "fc2": (328, 64)}
M_VALUES = [1, 2, 4, 8, 16, 64, 256, 2048]
QUICK_M = [1, 3, 20]
EXPERTS = 8
PEERS = ("torch_int4", "bnb_nf4")
TOL = 1e-2
TARGETS = [((2, 16), 1.5), ((64, 256), 1.0), ((2048, 2048), 0.95)]  # issue 13: speedup over cuBLAS bf16 by M


class Unavailable(Exception):
    """A method that cannot run on this machine (not a failure)."""


@dataclasses.dataclass
class Method:
    """One way to compute ``x @ W^T``: ``run(x, i, row_expert, prepared)`` with weight copy ``i`` (``copies`` of
    them, ``bytes_per_copy`` each) and ``ref`` the float32 weight (``[N, K]``, or ``[E, N, K]`` with ``row_expert``)
    it computes with. ``prepare(x)``, if given, makes what the step hands the kernel beside ``x`` (the int4 input
    planes that the add + norm before it writes, or the workspace it writes into: :func:`step_inputs`), once per
    input, outside the timed call."""

    name: str
    ref: torch.Tensor
    run: object
    copies: int
    bytes_per_copy: int
    prepare: object = None
    rows: tuple = (1, 1 << 30)  # the M it is timed at (min, max)


def target_for(m: int) -> float | None:
    return next((t for (lo, hi), t in TARGETS if lo <= m <= hi), None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if err == err else float("inf")  # NaN fails


def reference(x, method: Method, row_expert=None) -> torch.Tensor:
    """``x @ W_ref^T`` in float32 (routed rows expert by expert: no ``[M, N, K]`` gather)."""
    if row_expert is None:
        return x.float() @ method.ref.t()
    out = torch.empty(x.shape[0], method.ref.shape[1], device=x.device, dtype=torch.float32)
    for e in row_expert.unique().tolist():
        rows = row_expert == e
        out[rows] = x[rows].float() @ method.ref[e].t()
    return out


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def step_inputs(x, weight: PackedWeight, policy: DecodePolicy, routed: bool = False) -> dict:
    """What a BlackMamba step hands the kernel beside ``x``, made once per input outside the timed call: at one row
    the int4 input planes that the add + norm before a dense matrix writes; where the decode kernel does not take
    the rows (2..16), the float32 workspace view the general kernel writes (split-K adds into it), which the step
    zeroes with one memset a token for all its matrices."""
    m = x.shape[0]
    if policy.takes(weight, m, routed=routed):
        planes = policy.int4_x_planes and m == 1 and weight.fmt == 3 and not routed
        return dict(x_planes=int4_x_planes(x) if planes else None)
    if m <= GEMV_MAX_M:
        return dict(out=workspace(x, weight.n))
    return {}


def workspace(x, n: int) -> torch.Tensor:
    """A zeroed float32 ``[M, n]`` output, as the fused step's workspace view (split-K adds into it)."""
    return torch.zeros(x.shape[0], n, device=x.device, dtype=torch.float32)


def runtime_matmul(x, weight: PackedWeight, policy: DecodePolicy, row_expert=None, plane_sums: bool = True,
                   inputs: dict | None = None):
    """``x @ W^T`` the way a BlackMamba step or prefill runs it (see the module docstring); int4 plane words or
    float weights. ``inputs``: :func:`step_inputs` (None: the input alone, a new output)."""
    m = x.shape[0]
    inputs = inputs or {}
    routed = row_expert is not None
    if policy.takes(weight, m, routed=routed):  # the decode kernel: 1 row, or routed rows (row programs)
        out = torch.empty(m, weight.n, device=x.device, dtype=x.dtype)
        return decode_linear(x, weight, out, row_expert=row_expert, policy=policy, x_planes=inputs.get("x_planes"),
                             x_plane_sums=plane_sums)
    return dequant_matmul(x, weight, row_expert=row_expert, out=inputs.get("out"))


def parse_tile(spec: str) -> MatmulConfig:
    """``16x32k1w4s3`` -> the small-M kernel's tile: 16 rows, 32 weight rows, split-K 1, 4 warps, 3 stages (the
    plane words' K tile is 128)."""
    m = re.fullmatch(r"(\d+)x(\d+)k(\d+)w(\d+)s(\d+)", spec)
    if not m:
        raise ValueError(f"tile {spec!r}: expected ROWSxCOLSkSPLITwWARPSsSTAGES, e.g. 16x32k1w4s3")
    bm_, bn, split, warps, stages = map(int, m.groups())
    return MatmulConfig(bm_, bn, 128, split, warps, stages)


def small_m_methods(planes: PackedWeight, copies: list, ref, per_copy: int, tiles) -> dict:
    """``int4_sm_<tile>`` for each tile spec, see the module docstring."""
    out = {}
    for spec in tiles:
        def run(x, i, r=None, ws=None, cfg=parse_tile(spec)):
            return dequant_matmul(x, copies[i], config=cfg, out=ws)
        out[f"int4_sm_{spec}"] = Method(f"int4_sm_{spec}", ref, run, len(copies), per_copy, rows=(2, GEMV_MAX_M),
                                        prepare=lambda x: workspace(x, planes.n))
    return out


def build_methods(k: int, n: int, dev, peers, policy: DecodePolicy, experts: int = 0, plane_sums: bool = True,
                  timing: bool = True, small_m_tiles=()):
    """name -> Method (or an ``Unavailable`` exception) for a ``[N, K]`` matrix (``experts``: a stack)."""
    g = torch.Generator(device="cpu").manual_seed(k * 7 + n)
    w = (torch.randn(*((experts,) if experts else ()), n, k, generator=g) / k ** 0.5).to(dev)
    fmt = Int4Format(128)
    int4 = fmt.kernel_weight(fmt.quantize_rtn(w), n, k)
    planes = int4.to_planes()
    w_int4 = int4.dequantized(torch.float32)
    if not experts:
        w_int4 = w_int4[0]
    cp = lambda nbytes: copies_for(nbytes) if timing else 1  # noqa: E731
    methods = {}
    int4_bytes = _nbytes(planes.qweight, planes.scales, planes.zeros)
    int4_copies = clones(planes, int4_bytes) if timing else [planes]
    if experts:
        bf16 = PackedWeight.from_float(w.to(torch.bfloat16))
        bf16_copies = clones(bf16, _nbytes(bf16.qweight)) if timing else [bf16]
        methods["bf16_ours"] = Method(
            "bf16_ours", bf16.qweight.float(),
            lambda x, i, r=None, inputs=None: runtime_matmul(x, bf16_copies[i], policy, r, inputs=inputs),
            len(bf16_copies), _nbytes(bf16.qweight), prepare=lambda x: step_inputs(x, bf16, policy, routed=True))
    else:
        wb = w.to(torch.bfloat16)
        mats = [wb] + [wb.clone() for _ in range(cp(_nbytes(wb)) - 1)]
        methods["cublas_bf16"] = Method("cublas_bf16", wb.float(),
                                        lambda x, i, r=None: F.linear(x, mats[i].to(x.dtype)), len(mats), _nbytes(wb))
    methods["int4_g128"] = Method("int4_g128", w_int4, lambda x, i, r=None, inputs=None: runtime_matmul(
        x, int4_copies[i], policy, r, plane_sums, inputs), len(int4_copies), int4_bytes,
        prepare=lambda x: step_inputs(x, planes, policy, routed=bool(experts)))
    if small_m_tiles and not experts:
        methods.update(small_m_methods(planes, int4_copies, w_int4, int4_bytes, small_m_tiles))
    for peer in peers if not experts else ():
        try:
            methods[peer] = PEER_BUILDERS[peer](w, int4, w_int4, dev, cp)
        except Unavailable as exc:
            methods[peer] = exc
    return methods


def _torch_int4(w, int4: PackedWeight, w_int4, dev, cp):
    """tinygemm on our codes: its weight is ``(q - 8) * scale + zero``, so ``zero = (8 - z) * scale`` reproduces
    ``(q - z) * scale`` (bf16 scales and zeros: the check allows their rounding)."""
    if dev.type != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        raise Unavailable("needs CUDA and torch's _weight_int4pack_mm")
    n, k = int4.n, int4.k
    if k % 128 or n % 8:
        raise Unavailable(f"K = {k} not a multiple of 128 (tinygemm's group and tile)")
    from qmamba.quant.layout import unpack_int4

    codes, zeros = unpack_int4(int4.qweight[0], int4.zeros[0], k)  # [N, K], [N, K / 128]
    scales = int4.scales[0].float()
    sz = torch.stack([scales.t(), ((8 - zeros.float()) * scales).t()], dim=-1).to(torch.bfloat16).contiguous()
    q = codes.to(torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
    except Exception as exc:  # noqa: BLE001 - the packing API changed across torch versions
        raise Unavailable(f"_convert_weight_to_int4pack: {type(exc).__name__}: {str(exc)[:80]}") from exc
    wref = ((q.float() - 8) * sz[..., 0].t().float().repeat_interleave(128, 1)
            + sz[..., 1].t().float().repeat_interleave(128, 1))
    copies = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(cp(_nbytes(packed, sz)) - 1)]
    return Method("torch_int4", wref, lambda x, i, r=None: torch.ops.aten._weight_int4pack_mm(x, copies[i][0], 128,
                                                                                                copies[i][1]),
                  len(copies), _nbytes(packed, sz))


def _bnb_nf4(w, int4, w_int4, dev, cp):
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise Unavailable("bitsandbytes is not installed") from exc
    if dev.type != "cuda":
        raise Unavailable("needs CUDA")
    wb = w.to(torch.bfloat16)
    made = []
    for _ in range(cp(wb.numel() // 2)):
        qw, st = bnb.functional.quantize_4bit(wb, quant_type="nf4", blocksize=64)
        made.append((qw, st))
    wref = bnb.functional.dequantize_4bit(made[0][0], made[0][1]).float()
    return Method("bnb_nf4", wref, lambda x, i, r=None: bnb.matmul_4bit(x, made[i][0].t(), quant_state=made[i][1]),
                  len(made), _nbytes(made[0][0], made[0][1].absmax))


PEER_BUILDERS = {"torch_int4": _torch_int4, "bnb_nf4": _bnb_nf4}


def bench_shape(label, k, n, m_values, dev, dtype, peers, policy, result, timing, experts=0, small_m_tiles=()):
    """Check, then time, every method at every M of one shape (that it serves); returns its rows (one a method and
    M)."""
    methods = build_methods(k, n, dev, peers, policy, experts, plane_sums=label not in ("out_proj", "fc2"),
                            timing=timing, small_m_tiles=small_m_tiles)
    rows = []
    for name, method in methods.items():
        if isinstance(method, Unavailable):
            rows.append(dict(shape=label, method=name, unavailable=str(method)))
            print(f"{label:10s} {name:12s} unavailable: {method}", flush=True)
            continue
        for m in [m for m in m_values if method.rows[0] <= m <= method.rows[1]]:
            g = torch.Generator(device="cpu").manual_seed(m)
            x = torch.randn(m, k, generator=g).to(dev, dtype)
            r = torch.randint(0, experts, (m,), generator=g, dtype=torch.int32).to(dev) if experts else None
            row = dict(shape=label, k=k, n=n, experts=experts or 1, m=m, method=name)
            prepared = () if method.prepare is None else (method.prepare(x),)
            try:
                err = rel_err(method.run(x, 0, r, *prepared), reference(x, method, r))
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with the others
                err, row["error"] = float("inf"), f"{type(exc).__name__}: {str(exc)[:200]}"
            row["rel_err"] = err
            row["check_ok"] = err < TOL
            if not row["check_ok"]:
                result["failures"].append(f"{label} M={m} {name}: rel err {err:.3g} {row.get('error', '')}")
            elif timing:
                fallbacks = len(EAGER_FALLBACKS)
                row["us"] = time_calls([lambda i=i: method.run(x, i, r, *prepared) for i in range(method.copies)])
                if len(EAGER_FALLBACKS) > fallbacks:  # not a graph node: host launch overhead included
                    row["eager"] = EAGER_FALLBACKS[-1]
            rows.append(row)
            us = f"{row['us']:9.2f} us" if "us" in row else "   (not timed)"
            print(f"{label:10s} {name:12s} M={m:5d} {us}  rel err {err:.1e}{'' if row['check_ok'] else '  FAILED'}"
                  f"{'  (eager launches: not capturable)' if 'eager' in row else ''}", flush=True)
    return rows


def table(rows, base: str) -> str:
    """Markdown: per shape and M, each method's us and the speedup of int4 over ``base``."""
    names = []
    for r in rows:
        if "us" in r and r["method"] not in names:
            names.append(r["method"])
    if base not in names or "int4_g128" not in names:
        return ""
    by = {(r["shape"], r["m"], r["method"]): r["us"] for r in rows if "us" in r}
    lines = ["| shape | M | " + " | ".join(f"{n} us" for n in names) + f" | int4 speedup over {base} | target |",
             "|---|---:|" + "---:|" * len(names) + "---:|---|"]
    for shape, m in dict.fromkeys((r["shape"], r["m"]) for r in rows if "us" in r):
        us = [by.get((shape, m, n)) for n in names]
        sp = (by[(shape, m, base)] / by[(shape, m, "int4_g128")]
              if (shape, m, base) in by and (shape, m, "int4_g128") in by else None)
        t = target_for(m) if base == "cublas_bf16" else None
        verdict = "-" if t is None or sp is None else f">= {t}: {'met' if sp >= t else 'missed'}"
        lines.append(f"| {shape} | {m} | " + " | ".join("-" if u is None else f"{u:.2f}" for u in us)
                     + f" | {'-' if sp is None else f'{sp:.2f}x'} | {verdict} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the rows here")
    ap.add_argument("--m", default="", help=f"input rows, comma-separated [{','.join(map(str, M_VALUES))}]")
    ap.add_argument("--shapes", default="", help=f"of {', '.join(SHAPES)} [all]")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"of {', '.join(PEERS)} ('' for none)")
    ap.add_argument("--experts", action="store_true", help="also fc1 / fc2 as routed stacks of 8 experts")
    ap.add_argument("--small-m-tiles", default="", help="candidate tiles of the small-M kernel at 2-16 rows, e.g. "
                    "16x32k1w4s3,16x128k4w4s3 (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: tiny shapes, checks only (no timing)")
    return ap


def main():
    args = build_parser().parse_args()
    peers = [p for p in args.peers.split(",") if p]
    bad = [p for p in peers if p not in PEERS]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    chosen = [s for s in args.shapes.split(",") if s] or list(shapes)
    bad += [s for s in chosen if s not in shapes]
    if bad:
        sys.exit(f"error: unknown peer(s) or shape(s) {bad}: peers {', '.join(PEERS)}; shapes {', '.join(shapes)}")
    m_values = [int(v) for v in args.m.split(",") if v] or (QUICK_M if args.quick else M_VALUES)
    tiles = [t for t in args.small_m_tiles.split(",") if t]
    try:
        [parse_tile(t) for t in tiles]
    except ValueError as exc:
        sys.exit(f"error: --small-m-tiles: {exc}")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    timing = dev.type == "cuda"
    if timing:
        require_idle_gpu()
    elif not args.quick:
        sys.exit("error: no CUDA device: timing needs one (--quick runs the checks on the CPU)")
    dtype = torch.bfloat16 if timing else torch.float32
    policy = DecodePolicy.for_device(dev)
    result = dict(device=torch.cuda.get_device_name(0) if timing else "cpu", torch=torch.__version__,
                  policy=str(policy), rows=[], failures=[])
    out = Path(args.json)
    with torch.no_grad():
        for label in chosen:
            k, n = shapes[label]
            result["rows"] += bench_shape(label, k, n, m_values, dev, dtype, peers, policy, result, timing,
                                          small_m_tiles=tiles)
            out.write_text(json.dumps(result, indent=1))
        if args.experts:
            for label in [s for s in ("fc1", "fc2") if s in shapes]:
                k, n = shapes[label]
                result["rows"] += bench_shape(f"{label} x{EXPERTS}", k, n, m_values, dev, dtype, (), policy, result,
                                              timing, experts=EXPERTS)
                out.write_text(json.dumps(result, indent=1))
    dense = [r for r in result["rows"] if "x" not in r["shape"].split()[-1]]
    stacks = [r for r in result["rows"] if r not in dense]
    for rows, base in ((dense, "cublas_bf16"), (stacks, "bf16_ours")):
        text = table(rows, base)
        if text:
            print(f"\nus per call ({result['device']}; CUDA-graph replay, rotating weight copies)\n{text}")
    if result["failures"]:
        print("FAILED:\n  " + "\n  ".join(result["failures"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
