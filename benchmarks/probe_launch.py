"""Launch-latency probes for the decode step (run on the GPU): what a chain of small dependent kernels costs.

    python benchmarks/probe_launch.py [--out probe.json] [--parts chain,persistent,ahead,barrier]
    python benchmarks/probe_launch.py --compile-only     # no GPU: the "ahead" kernels for sm_90 (registers,
        # spills, and where the SASS waits for the weight loads; exits non-zero if before the barrier's spin)

A decode token of BlackMamba-2.8B is ~100-180 small dependent kernels (GEMVs of 1-6 MB and elementwise steps),
so its time is set by per-kernel latency, not by bytes. This measures, inside one CUDA graph:

* ``chain``: N GEMV-like kernels, each reading its own int8 weight ``[N, K]`` (bytes of an int4 in_proj) and the
  previous kernel's output vector: no PDL; PDL (programmatic dependent launch) waiting at the top; PDL with the
  weight tile loaded *before* the wait (the weight does not depend on the previous kernel).
  With that, ``pdl_l2pf``: each kernel also asks L2 for the weight of the kernel two later
  (:func:`prefetch_l2`), and ``pdl_l2res``: every kernel reads the same weight (in L2 after the first:
  the bound for weights that are all L2 hits).
* ``persistent``: the same chain as one persistent launch (one or two programs a multiprocessor, all co-resident: a
  cooperative launch, each looping over its row tiles), a counter barrier between dependent GEMVs instead of a kernel
  boundary, each program's first tile of the next layer loaded before it arrives at the barrier (``_pre``) or after
  it leaves: what a whole-step persistent kernel would pay per dependent phase; ``_l2``: all of the program's
  next-layer tiles asked of L2 (bulk prefetch) after it arrives and before it spins.
* ``ahead``: the persistent chain with one row tile a program (all co-resident) and the program's tiles of the
  next one or two layers loaded right after it arrives at the barrier and before it spins, as int32 words unpacked
  only at their use (:func:`_persistent_ahead`): session 20's ``persistent`` waited for its preloaded int8 tile
  before the barrier (the bytes are unpacked right after the load) and had most tiles loaded after it. This is
  the building block of a whole-step persistent decode kernel: each phase should cost about max(its bytes at DRAM
  bandwidth, one barrier) instead of a kernel boundary.
* ``barrier``: a persistent kernel whose programs meet at a counter barrier R times (the cost of one grid-wide
  synchronisation, the building block of a whole-step persistent kernel).

Every variant's output is compared with a PyTorch computation of the same chain; a mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (N, K, BLOCK_N, warps) of the "ahead" chains: one tile a program, so N / BLOCK_N programs must be co-resident
# (in_proj-, out_proj- and fc1-sized, as the chain's shapes)
AHEAD_SHAPES = ((5888, 736, 16, 4), (5888, 736, 32, 8), (1472, 1472, 8, 4), (7744, 736, 16, 4), (7744, 736, 32, 8))

from inspect_decode_kernel import _Recorder  # noqa: E402



@triton.jit
def bulk_prefetch_l2(ptr, size):
    """Hopper's ``cp.async.bulk.prefetch.L2`` of ``size`` bytes at ``ptr`` (an int8 pointer, 16-byte aligned, a
    multiple of 16), elementwise; an element with ``size <= 0`` asks nothing. Nothing to wait for, nothing in
    registers."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, size], dtype=tl.int32, is_pure=False, pack=1)


def resident_programs(compiled, num_warps: int, device) -> int:
    """How many programs of a compiled kernel (Triton's ``CompiledKernel``) the GPU holds at once: by registers
    (allocated 8 at a time a thread), threads and shared memory a multiprocessor, times the multiprocessors."""
    compiled._init_handles()  # loads the binary: sets n_regs
    props = torch.cuda.get_device_properties(device)
    threads = 32 * num_warps
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (-(-max(compiled.n_regs, 1) // 8) * 8 * threads)
    by_threads = props.max_threads_per_multi_processor // threads
    smem = compiled.metadata.shared
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // smem if smem else by_threads
    return min(by_regs, by_threads, by_smem, 32) * props.multi_processor_count


@triton.jit
def prefetch_l2(ptr, nbytes, chunk, part, NT: tl.constexpr):
    """Program ``part``'s share of ``[ptr, ptr + nbytes)`` into L2 (Hopper's bulk prefetch): lane 0 of each warp
    asks for ``chunk`` bytes (16-byte aligned, a multiple of 16), clipped at the end. (Session 20 tried this in the
    decode step itself, ``DecodePolicy.l2_prefetch``, commit d4b7429: not faster.)"""
    t = tl.arange(0, NT)
    start = (part * (NT // 32) + t // 32).to(tl.int64) * chunk
    size = tl.where(t % 32 == 0, tl.minimum(nbytes - start, chunk), 0).to(tl.int32)
    bulk_prefetch_l2(ptr.to(tl.pointer_type(tl.int8)) + start, size)


def prefetch_chunk(nbytes: int, programs: int, warps: int) -> int:
    """Bytes each warp of a grid prefetches to cover ``nbytes`` (a multiple of 16)."""
    return -(-(-(-nbytes // (programs * warps))) // 16) * 16


@triton.jit
def _gemv_i8(w_ptr, x_ptr, y_ptr, N, scale, pf_ptr, pf_bytes, pf_chunk, K: tl.constexpr, KP: tl.constexpr,
             PDL: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, L2PF: tl.constexpr, NT: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, KP)
    wm = (n < N)[:, None] & (k < K)[None, :]
    if PDL and PREFETCH:
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=wm, other=0)
        if L2PF:  # a later kernel's weight into L2 (prefetch_l2)
            prefetch_l2(pf_ptr, pf_bytes, pf_chunk, pid, NT)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    elif PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=wm, other=0)
    else:
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=wm, other=0)
    x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) * scale
    tl.store(y_ptr + n, y, mask=n < N)


@triton.jit
def _barrier_kernel(counter_ptr, out_ptr, ROUNDS, NPROG):
    pid = tl.program_id(0)
    cur = 0
    for r in range(ROUNDS):
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        target = (r + 1) * NPROG
        cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while cur < target:
            cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.store(out_ptr + pid, cur)


@triton.jit
def _persistent_chain(w_ptr, x0_ptr, y_ptr, counter_ptr, N, scale, LAYERS, NPROG, K: tl.constexpr,
                      KP: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, PRELOAD: tl.constexpr,
                      L2AHEAD: tl.constexpr = False, NT: tl.constexpr = 256):
    """``y[l] = scale * W[l] @ y[l-1][:K]`` (``x0`` for l = 0) for ``LAYERS`` layers in one launch of ``NPROG``
    co-resident programs: program ``pid`` owns the row tiles ``pid + i * NPROG`` (i < ``TILES``) of every layer; a
    counter barrier (monotonic: layer l ends when it reaches (l + 1) * NPROG) separates the layers. ``PRELOAD``: the
    first tile of the next layer is loaded before the barrier (the others after it). ``L2AHEAD``: after its release
    and before it spins, the program asks L2 for all its tiles of the next layer (Hopper's bulk prefetch, lane 0 of
    warp i for tile i, ``TILES`` <= warps: nothing in registers, nothing to wait for), so after the barrier its loads
    are L2 hits."""
    pid = tl.program_id(0)
    k = tl.arange(0, KP)
    km = k < K
    rows = tl.arange(0, BLOCK_N)
    n0 = pid * BLOCK_N + rows
    w0 = tl.load(w_ptr + n0[:, None] * K + k[None, :], mask=(n0 < N)[:, None] & km[None, :], other=0)
    x = tl.load(x0_ptr + k, mask=km, other=0.0)
    for layer in range(LAYERS):
        base = w_ptr + layer * N * K  # < 2^31 bytes here (100 layers of <= 5.7 MB)
        for i in range(TILES):
            n = (pid + i * NPROG) * BLOCK_N + rows
            nm = n < N
            if PRELOAD:
                if i == 0:
                    w = w0
                else:
                    w = tl.load(base + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0)
            else:
                w = tl.load(base + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0)
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) * scale
            tl.store(y_ptr + layer * N + n, y, mask=nm)
        if layer + 1 < LAYERS:
            if PRELOAD:
                w0 = tl.load(base + N * K + n0[:, None] * K + k[None, :], mask=(n0 < N)[:, None] & km[None, :],
                             other=0)
            tl.debug_barrier()  # every thread's stores before the release
            tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
            if L2AHEAD:
                t = tl.arange(0, NT)
                tile = pid + (t // 32) * NPROG
                row0 = tile * BLOCK_N
                size = tl.where((t % 32 == 0) & (t // 32 < TILES) & (row0 < N),
                                tl.minimum(N - row0, BLOCK_N) * K, 0).to(tl.int32)
                bulk_prefetch_l2(base + N * K + row0 * K, size)
            target = (layer + 1) * NPROG
            cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            while cur < target:
                cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
            x = tl.load(y_ptr + layer * N + k, mask=km, other=0.0, cache_modifier=".cg")  # other programs': from L2


@triton.jit
def _ahead_gemv(w, x_ptr, c, KW: tl.constexpr):
    """``w [BLOCK_N, KWP]`` int32 words of 4 int8 weights each (byte j of word c: column 4 c + j) times ``x``: the
    bytes are unpacked here, at the use, so the compiler has nothing to do with the loaded words before it."""
    cm = c < KW
    acc = tl.zeros(w.shape, tl.float32)
    for j in tl.static_range(4):
        xj = tl.load(x_ptr + 4 * c + j, mask=cm, other=0.0, cache_modifier=".cg")  # other programs': from L2
        acc += ((w << (24 - 8 * j)) >> 24).to(tl.float32) * xj[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _persistent_ahead(w_ptr, x0_ptr, y_ptr, counter_ptr, N, scale, LAYERS, NPROG, KW: tl.constexpr,
                      KWP: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
    """The chain of :func:`_persistent_chain` with one row tile a program a layer (``NPROG`` = the tile count, all
    co-resident) and the program's tiles of the next ``DEPTH`` (1 or 2) layers in flight through each barrier.

    The weights (``int8 [LAYERS, N, 4 KW]`` read as ``KW`` int32 words a row) do not depend on the barrier, so
    each program issues the loads of layer ``l + DEPTH`` right after it arrives (after its release: a release may
    wait for the thread's outstanding loads) and before it spins, and unpacks them only when it uses them (int8
    loads are unpacked to a byte a register right after the load, which waits for them before the barrier: session
    20's persistent chain did that). The barrier's wait then hides the loads' DRAM latency."""
    pid = tl.program_id(0)
    c = tl.arange(0, KWP)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    wm = (n < N)[:, None] & (c < KW)[None, :]
    words = w_ptr.to(tl.pointer_type(tl.int32))
    offs = n[:, None] * KW + c[None, :]
    w0 = tl.load(words + offs, mask=wm, other=0)
    w1 = w0
    if DEPTH == 2:
        w1 = tl.load(words + N * KW + offs, mask=wm & (LAYERS > 1), other=0)
    x_ptr = x0_ptr
    for layer in range(LAYERS):
        y = _ahead_gemv(w0, x_ptr, c, KW) * scale
        tl.store(y_ptr + layer * N + n, y, mask=n < N)
        if layer + 1 < LAYERS:
            tl.debug_barrier()  # every thread's stores before the release
            tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
            ahead = layer + DEPTH  # in flight through the barrier
            nxt = tl.load(words + ahead * N * KW + offs, mask=wm & (ahead < LAYERS), other=0)
            if DEPTH == 2:
                w0 = w1
                w1 = nxt
            else:
                w0 = nxt
            # (a plain spin, no time-out: with a spin count as a second loop-carried value, ptxas moves DEPTH 2's
            # rotated words inside the spin and waits for their loads there)
            target = (layer + 1) * NPROG
            cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            while cur < target:
                cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
            x_ptr = y_ptr + layer * N


def _check_and_time_persistent(name: str, run, w, x0, y, c, results: dict, failures: list, label: str):
    """Run a persistent chain once, check every layer against ``c W_l y_{l-1}`` (PyTorch, from the stored outputs),
    then time five launches; a mismatch or an error goes to ``failures``."""
    n_layers, n, k = w.shape
    try:
        run()
        torch.cuda.synchronize()
        prev = torch.cat([x0[None, :], y[:-1, :k]])
        want = torch.einsum("lnk,lk->ln", w.float(), prev) * c
        err = ((y - want).norm() / want.norm()).item()
        if not err < 1e-4:
            failures.append(f"{name}: rel err {err:.2e}")
        ts = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / n_layers)
        us = statistics.median(ts)
        mb = n * k / 1e6
        results[f"{name}_n{n}_k{k}_{label}"] = dict(us_per_layer=us, mb_per_layer=mb, rel_err=err)
        print(f"{name:19s} N={n} K={k} {label}: {us:6.2f} us/layer ({mb / us * 1e3:.0f} GB/s) err {err:.1e}",
              flush=True)
    except Exception as exc:  # noqa: BLE001 - report and fail the run
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)


def _chain_data(n_layers: int, n: int, k: int):
    w = torch.randint(-127, 128, (n_layers, n, k), device="cuda", dtype=torch.int8)
    x0 = torch.randn(k, device="cuda")
    return w, x0, 1.0 / (73.3 * k ** 0.5), torch.empty(n_layers, n, device="cuda")


def persistent(n_layers: int, n: int, k: int, block_n: int, num_warps: int, per_sm: int, results: dict,
               failures: list):
    """The chain of :func:`chain` as one persistent launch of ``per_sm`` programs a multiprocessor (see the module
    docstring)."""
    w, x0, c, y = _chain_data(n_layers, n, k)
    tiles = triton.cdiv(n, block_n)
    nprog = min(tiles, per_sm * torch.cuda.get_device_properties(0).multi_processor_count)
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    n_tiles = triton.cdiv(tiles, nprog)
    for suffix, pre, l2 in (("", False, False), ("_pre", True, False), ("_l2", False, True)):
        if l2 and n_tiles > num_warps:
            continue

        def run():
            counter.zero_()
            _persistent_chain[(nprog,)](w, x0, y, counter, n, c, n_layers, nprog, K=k, KP=triton.next_power_of_2(k),
                                        BLOCK_N=block_n, TILES=n_tiles, PRELOAD=pre, L2AHEAD=l2, NT=32 * num_warps,
                                        num_warps=num_warps, launch_cooperative_grid=True)
        _check_and_time_persistent(f"persistent{suffix}", run, w, x0, y, c, results, failures,
                                   f"bn{block_n}_w{num_warps}_p{nprog}")


def _ahead_launch(w, x0, y, counter, c, block_n: int, depth: int, num_warps: int, kernel=None):
    n_layers, n, k = w.shape
    nprog = triton.cdiv(n, block_n)
    assert k % 4 == 0
    (kernel or _persistent_ahead)[(nprog,)](w, x0, y, counter, n, c, n_layers, nprog, KW=k // 4,
                                            KWP=triton.next_power_of_2(k // 4), BLOCK_N=block_n, DEPTH=depth,
                                            num_warps=num_warps, launch_cooperative_grid=True)


def persistent_ahead(n_layers: int, n: int, k: int, block_n: int, num_warps: int, results: dict, failures: list):
    """The chain as one persistent launch of one row tile a program (:func:`_persistent_ahead`), the next one or two
    layers' tiles in flight through each barrier. A depth whose tile count is not co-resident (its registers) is
    skipped with a line saying so."""
    w, x0, c, y = _chain_data(n_layers, n, k)
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    nprog = triton.cdiv(n, block_n)
    for depth in (1, 2):
        def run():
            counter.zero_()
            _ahead_launch(w, x0, y, counter, c, block_n, depth, num_warps)
        recorder = _Recorder(_persistent_ahead)
        _ahead_launch(w, x0, y, counter, c, block_n, depth, num_warps, kernel=recorder)
        grid, args, meta = recorder.calls[-1]
        meta = {key: val for key, val in meta.items() if key != "launch_cooperative_grid"}
        fits = resident_programs(_persistent_ahead.warmup(*args, grid=grid, **meta), num_warps, "cuda")
        label = f"bn{block_n}_w{num_warps}_p{nprog}"
        if nprog > fits:
            print(f"persistent_ahead{depth}  N={n} K={k} {label}: skipped, {nprog} programs > {fits} co-resident",
                  flush=True)
            continue
        _check_and_time_persistent(f"persistent_ahead{depth}", run, w, x0, y, c, results, failures, label)


def ahead_waits_before_spin(sass: str) -> list[str]:
    """The instructions of :func:`_persistent_ahead`'s SASS that wait for the next layers' weight loads between
    the barrier's release and the end of its spin loop (empty: the loads stay in flight through the barrier, as
    meant). The weight loads are the plain (not ``.STRONG``) 128-bit ``LDG`` after the release (``RED``); the spin
    loop ends at the first backward branch after them."""
    from inspect_decode_kernel import control_codes

    ins = control_codes(sass)
    release = max(i for i, d in enumerate(ins) if re.search(r"\bREDG?\.", d["text"]))
    sbs, early = set(), []
    for d in ins[release + 1:]:
        if sbs & set(d["waits"]):
            early.append(f"{d['addr']:#x} {d['text']}")
        if re.search(r"\bLDG\.E\.128\b", d["text"]) and "STRONG" not in d["text"] and d["write_sb"] is not None:
            sbs.add(d["write_sb"])
        branch = re.search(r"\bBRA (0x[0-9a-f]+)", d["text"])
        if branch and int(branch.group(1), 16) < d["addr"] and sbs:
            return early
    raise ValueError("ahead_waits_before_spin: no spin loop after the release")


def compile_ahead_offline(n: int, k: int, block_n: int, depth: int, num_warps: int, arch: int = 90):
    """:func:`_persistent_ahead` compiled for ``sm_<arch>`` without a GPU (as ``persistent_ahead`` launches it):
    registers, spills, and whether the SASS waits for the next layer's weight loads before the barrier's spin
    loop (it must not: the loads are to stay in flight through the barrier)."""
    from inspect_decode_kernel import compile_recorded, report

    recorder = _Recorder(_persistent_ahead)
    w = torch.zeros(3, n, k, dtype=torch.int8)
    v = torch.zeros(k)
    _ahead_launch(w, v, torch.zeros(3, n), torch.zeros(1, dtype=torch.int32), 0.5, block_n, depth, num_warps,
                  kernel=recorder)
    _, args, meta = recorder.calls[-1]
    meta = {key: val for key, val in meta.items() if key != "launch_cooperative_grid"}
    return report(compile_recorded(_persistent_ahead, args, meta, arch))


def graph_us(fn, calls: int, reps: int = 7) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def chain(n_kernels: int, n: int, k: int, block_n: int, num_warps: int, results: dict, failures: list):
    """``y_i = c W_i x_{i-1}``, ``x_i`` the first K entries of ``y_i`` (N >= K); c keeps the values near 1."""
    ws = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(n_kernels)]
    x0 = torch.randn(k, device="cuda")
    c = 1.0 / (73.3 * k ** 0.5)
    for name, pdl, pre, l2 in (("plain", False, False, ""), ("pdl", True, False, ""), ("pdl_prefetch", True, True, ""),
                               ("pdl_l2pf", True, True, "pf"), ("pdl_l2res", True, True, "res")):
        ys = [torch.empty(n, device="cuda") for _ in range(n_kernels)]
        grid = (triton.cdiv(n, block_n),)
        chunk = prefetch_chunk(n * k, grid[0], num_warps)
        wk = [ws[0]] * n_kernels if l2 == "res" else ws

        def run():
            x = x0
            for i, w in enumerate(wk):
                pf = wk[min(i + 2, n_kernels - 1)]
                _gemv_i8[grid](w, x, ys[i], n, c, pf, n * k, chunk, K=k, KP=triton.next_power_of_2(k), PDL=pdl,
                               PREFETCH=pre, BLOCK_N=block_n, L2PF=l2 == "pf", NT=32 * num_warps,
                               num_warps=num_warps, launch_pdl=pdl)
                x = ys[i]
        try:
            us = graph_us(run, n_kernels)
            # correctness of the chain without the renormalisation: compare the first kernel and the relation
            y_check = (ws[0].float() @ x0) * c
            err = ((ys[0] - y_check).norm() / y_check.norm()).item()
            y_last = (wk[-1].float() @ ys[-2][:k]) * c
            err2 = ((ys[-1] - y_last).norm() / y_last.norm().clamp_min(1e-30)).item()
            ok = err < 1e-4 and err2 < 1e-4
            if not ok:
                failures.append(f"chain {name}: rel err {err:.2e} / {err2:.2e}")
            mb = n * k / 1e6
            results[f"chain_{name}_n{n}_k{k}_bn{block_n}"] = dict(us_per_kernel=us, mb_per_kernel=mb,
                                                                  rel_err=max(err, err2))
            print(f"chain {name:13s} N={n} K={k} BN={block_n} w={num_warps}: {us:6.2f} us/kernel "
                  f"({mb:.2f} MB, {mb / us * 1e3:.0f} GB/s) err {max(err, err2):.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and fail the run
            failures.append(f"chain {name}: {type(exc).__name__}: {exc}")
            print(f"chain {name}: FAILED {type(exc).__name__}: {exc}", flush=True)


def barrier(nprog: int, rounds: int, results: dict, failures: list, cooperative: bool):
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    out = torch.zeros(nprog, device="cuda", dtype=torch.int32)
    kw = dict(launch_cooperative_grid=True) if cooperative else {}
    try:
        _barrier_kernel[(nprog,)](counter, out, 1, nprog, num_warps=4, **kw)  # compile
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            counter.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            _barrier_kernel[(nprog,)](counter, out, rounds, nprog, num_warps=4, **kw)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / rounds)
        ok = int(counter.item()) == rounds * nprog and bool((out == rounds * nprog).all())
        if not ok:
            failures.append(f"barrier {nprog}: counter {counter.item()} != {rounds * nprog}")
        us = statistics.median(ts)
        results[f"barrier_p{nprog}_coop{int(cooperative)}"] = dict(us_per_barrier=us)
        print(f"barrier {nprog} programs coop={cooperative}: {us:.2f} us per barrier, correct={ok}", flush=True)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"barrier: {type(exc).__name__}: {exc}")
        print(f"barrier FAILED {type(exc).__name__}: {exc}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--parts", default="chain,persistent,ahead,barrier",
                    help="comma-separated: chain, persistent, ahead, barrier")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU: compile the 'ahead' kernels for sm_90 and report registers, spills and waits")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.compile_only:
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        bad = []
        for n, k, bn, nw in AHEAD_SHAPES:
            for depth in (1, 2):
                r = compile_ahead_offline(n, k, bn, depth, nw)
                early = ahead_waits_before_spin(r["sass"])
                print(f"ahead{depth} N={n} K={k} BN={bn} w={nw}: regs {r['regs']} stack {r['stack']} SASS "
                      f"{sum(r['ops'].values())} LDG {r['ops']['LDG']} waits on a load before the spin: {early}",
                      flush=True)
                if r["stack"] or early:
                    bad.append(f"ahead{depth} N={n} BN={bn}")
        if bad:
            sys.exit("spills or early waits: " + ", ".join(bad))
        return
    props = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), "SMs", props.multi_processor_count, "torch", torch.__version__,
          "triton", triton.__version__, flush=True)
    results, failures = {}, []
    # in_proj-sized (int4 1472x5888 = 4.3 MB): as int8 [5888, 736]; x_proj-sized [128, 2944/2]; out_proj [1472, 1472]
    for n, k, bn, nw in ((5888, 736, 16, 4), (5888, 736, 4, 4), (1472, 1472, 8, 4), (7744, 736, 8, 4)):
        if "chain" in parts:
            chain(100, n, k, bn, nw, results, failures)
    # one or two programs a multiprocessor, 8 warps (<= 128 registers at these tiles: two fit an H100 / H200 SM)
    for n, k, bn, per_sm in ((5888, 736, 8, 1), (5888, 736, 8, 2), (1472, 1472, 4, 2), (7744, 736, 8, 2)):
        if "persistent" in parts:
            persistent(100, n, k, bn, 8, per_sm, results, failures)
    if "ahead" in parts:
        for n, k, bn, nw in AHEAD_SHAPES:
            persistent_ahead(100, n, k, bn, nw, results, failures)
    sms = props.multi_processor_count
    if "barrier" in parts:
        for nprog in (sms, 2 * sms, 3 * sms, 4 * sms):  # 3-4 a multiprocessor: the persistent step's grids
            barrier(nprog, 2000, results, failures, cooperative=False)
        barrier(sms, 2000, results, failures, cooperative=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), results=results, failures=failures), f, indent=1)
    if failures:
        print("FAILURES:", *failures, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
