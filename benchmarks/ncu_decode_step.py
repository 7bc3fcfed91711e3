"""Hardware counters of one fused decode step, kernel by kernel, from Nsight Compute (run on the GPU).

    ncu --clock-control none --profile-from-start off --csv --page raw --metrics "$(python
        benchmarks/ncu_decode_step.py metrics)" python benchmarks/ncu_decode_step.py run --format int4_g128
        --batches 1,8 > step.csv
    python benchmarks/ncu_decode_step.py summary step.csv      # one line a kernel (no GPU needed)

``run`` builds the random-weight preset in a format of bench_e2e.py, runs three eager steps of the fused step
(:class:`qmamba.fused_step.FusedDecodeStep`, the kernels a CUDA graph replays) for each batch size, then one more
between ``cudaProfilerStart`` / ``cudaProfilerStop``, so that ncu (``--profile-from-start off``) records exactly one
step a batch size. ``summary`` prints, for each recorded kernel: grid, registers, ncu's duration, DRAM bytes read,
DRAM and SM throughput as a share of peak, achieved occupancy, warp instructions, and the four largest stall reasons
(cycles a warp waits per issued instruction).

ncu serialises kernels and times each alone: its durations include a launch each (~4.5 us for an empty kernel on the
H100) and no programmatic dependent launch overlap, so they are not the step's timings (``bench_decode.py`` and
``profile_decode.py`` give those, checked). Read the counters for what bounds each kernel: instructions, stalls,
bytes. The step's outputs are checked by ``bench_decode.py`` on the same code; this script only profiles.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

STALLS = ("long_scoreboard", "barrier", "short_scoreboard", "wait", "math_pipe_throttle", "lg_throttle",
          "mio_throttle", "membar", "no_instruction", "dispatch_stall", "not_selected", "selected", "drain",
          "imc_miss", "branch_resolving", "sleeping", "tex_throttle")
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "sm__throughput.avg.pct_of_peak_sustained_elapsed", "launch__grid_size", "launch__block_size",
           "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active",
           "smsp__inst_executed.sum", "lts__t_sector_hit_rate.pct") + tuple(
    f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS)


def run(fmt: str, batches: list[int], preset_name: str):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import build

    from qmamba.config import preset
    from qmamba.fused_step import FusedDecodeStep

    cfg = preset(preset_name)
    model = build(cfg, fmt, torch.bfloat16)
    step = FusedDecodeStep(model)
    cudart = torch.cuda.cudart()
    with torch.no_grad():
        for b in batches:
            ids = torch.randint(0, cfg.vocab_size, (b,), device="cuda")
            state = model.new_state(b)
            for _ in range(3):  # compiles and settles
                step(ids, state)
            torch.cuda.synchronize()
            print(f"profiling {fmt} batch {b}", file=sys.stderr, flush=True)
            cudart.cudaProfilerStart()
            step(ids, state)
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def summary(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"error: {path} has no ncu CSV table (a line starting with \"ID\")")
    rows = list(csv.reader(lines[start:]))
    header, records = rows[0], rows[2:]  # the second row holds the units
    out = []
    for rec in map(lambda r: dict(zip(header, r)), records):
        stalls = sorted(((s, _number(rec.get(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio", "")))
                         for s in STALLS), key=lambda kv: -kv[1] if kv[1] == kv[1] else 0)[:4]
        out.append(
            f"{rec['ID']:>4} {rec['Kernel Name'][:30]:30s} grid {rec['Grid Size']:>12s} "
            f"regs {rec.get('launch__registers_per_thread', '?'):>4s} "
            f"{_number(rec.get('gpu__time_duration.sum', '')) / 1e3:7.2f} us "
            f"dram {_number(rec.get('dram__bytes_read.sum', '')) / 1e6:7.2f} MB "
            f"{_number(rec.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', '')):5.1f}% "
            f"sm {_number(rec.get('sm__throughput.avg.pct_of_peak_sustained_elapsed', '')):5.1f}% "
            f"occ {_number(rec.get('sm__warps_active.avg.pct_of_peak_sustained_active', '')):5.1f}% "
            f"inst {_number(rec.get('smsp__inst_executed.sum', '')) / 1e3:8.1f}k  stalls "
            + " ".join(f"{name}={value:.1f}" for name, value in stalls))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("metrics", help="print the --metrics list for ncu")
    r = sub.add_parser("run", help="the ncu target: one profiled step a batch size")
    r.add_argument("--format", default="int4_g128")
    r.add_argument("--batches", default="1,8")
    r.add_argument("--preset", default="blackmamba-2.8b")
    s = sub.add_parser("summary", help="one line a kernel from ncu's --csv --page raw output")
    s.add_argument("csv")
    args = ap.parse_args()
    if args.cmd == "metrics":
        print(",".join(METRICS))
    elif args.cmd == "run":
        run(args.format, [int(b) for b in args.batches.split(",")], args.preset)
    else:
        print("\n".join(summary(args.csv)))


if __name__ == "__main__":
    main()
