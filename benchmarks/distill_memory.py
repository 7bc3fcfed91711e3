"""Bytes kept for the backward pass and step time of one distillation step, with and without the memory options
(block checkpointing + chunked KL), on a few layers of a preset at its full width and vocabulary.

    python benchmarks/distill_memory.py --preset blackmamba-2.8b --layers 4 --batch 2 --seq-len 256 --device cpu

The bytes come from :class:`qmamba.testing.SavedTensorBytes` (deterministic, any device); with ``--tokens-scan`` the
count is repeated at half the batch so that the per-token and the per-step (materialized trainable weights) parts
can be told apart. Step time: forward + loss + backward, median of ``--repeats``, on the given device.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from qmamba.calib.distill import DistillOptions, make_trainable, step_loss, trainable_groups
from qmamba.calib.train_scan import fast_training_scan
from qmamba.config import preset
from qmamba.quant.binary import BinaryFormat
from qmamba.testing import SavedTensorBytes, quantize_rtn, random_model

VARIANTS = {"plain": {"checkpoint_blocks": False, "loss_chunk_rows": None},
            "checkpointed": {"checkpoint_blocks": True, "loss_chunk_rows": None},
            "checkpointed+chunked": {}}  # the defaults


def build_pair(name: str, layers: int, device):
    """(trainable 1-bit student, float teacher) of the first ``layers`` blocks of preset ``name``."""
    cfg = preset(name)
    cfg.layers = cfg.layers[:layers]
    teacher = random_model(cfg, device).eval().requires_grad_(False)
    student = quantize_rtn(copy.deepcopy(teacher), BinaryFormat(), head=False)
    make_trainable(student, teacher, ste=False)
    trainable_groups(student, DistillOptions())
    return student.train(), teacher


def saved_bytes(student, teacher, batch, opts) -> int:
    weights = [*student.parameters(), *student.buffers(), *teacher.parameters(), *teacher.buffers()]
    with fast_training_scan(student), fast_training_scan(teacher), SavedTensorBytes(weights) as saved:
        step_loss(student, teacher, batch, opts)
    return saved.nbytes


def step_seconds(student, teacher, batch, opts, repeats: int) -> float:
    times = []
    with fast_training_scan(student), fast_training_scan(teacher):
        for _ in range(repeats):
            student.zero_grad(set_to_none=True)
            if batch.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step_loss(student, teacher, batch, opts).backward()
            if batch.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens-scan", action="store_true", help="also count the bytes at half the batch")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    student, teacher = build_pair(args.preset, args.layers, args.device)
    vocab = student.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)
    rows = {}
    for name, memory in VARIANTS.items():
        opts = DistillOptions(**memory)
        row = {"saved_bytes": saved_bytes(student, teacher, batch, opts)}
        if args.tokens_scan and args.batch >= 2:
            row["saved_bytes_half_batch"] = saved_bytes(student, teacher, batch[: args.batch // 2], opts)
        row["step_s"] = round(step_seconds(student, teacher, batch, opts, args.repeats), 3)
        rows[name] = row
        print(name, row, flush=True)
    print(json.dumps({"preset": args.preset, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
                      "device": args.device, "threads": torch.get_num_threads(), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
