"""A chain of dependent kernel launches replayed as one persistent launch, a grid barrier between launches.

The decode step is ~150 small dependent kernels; on the H200 each costs ~3.7 us however few bytes it reads
(benchmarks/results.md, session 21's profile), against ~0.9 us for a grid-wide barrier inside one kernel (session
20, ``benchmarks/probe_launch.py``). :func:`recording` captures a chain's launches of the kernels registered in
:data:`BODIES` (each a thin kernel over a ``*_program(pid0, pid1, ...)`` body) instead of running them;
:class:`PersistentChain` then runs the same bodies with the same arguments in one launch of ``programs`` co-resident
programs: program ``p`` runs tiles ``p, p + programs, ...`` of each recorded launch (tile ``t`` is the launch's
program ``(t // (g1 g2), (t // g2) % g1, t % g2)`` of its grid ``(g0, g1, g2)``), then meets the others at a counter
barrier before the next launch, asking L2 for its share of the next launch's weights (:data:`PREFETCHED`) before it
waits. So the chain computes exactly what the launches compute, in the same order, with the same arithmetic.

The kernel is generated per set of launch *kinds* (a body with its compile-time arguments): one ``noinline``
function per kind, whose run-time arguments come from an int64 table, a row per launch (pointers, and the integers
and floats that differ between the launches of a kind; the others are written into the source as constants, as
Triton's launch would specialise them). Pointers that are 16-byte aligned in every launch of a kind, and integers
divisible by 16 in every launch, carry that as a hint (Triton's own launch specialisation).

Every program must be resident at once (the barrier waits for all of them): :meth:`PersistentChain.programs_for`
sizes the grid from the compiled kernel's registers and shared memory. On CPU (the interpreter runs programs one
after another) the chain runs with one program. This module knows tensors and kernels, not models:
:mod:`qmamba.persistent_step` records the decode step.
"""

from __future__ import annotations

import hashlib
import importlib
import linecache
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qmamba.kernels._triton import HAS_TRITON, jit, tl

# kernel name -> (module, kernel attribute, body function, program ids it takes): the launches recording() captures
BODIES = {
    "decode_linear": ("qmamba.kernels.decode_linear", "_decode_linear_kernel", "decode_linear_program", 2),
    "add_norm": ("qmamba.kernels.decode_step", "_add_norm_kernel", "add_norm_program", 2),
    "dt_state_update": ("qmamba.kernels.decode_step", "_dt_state_update_kernel", "dt_state_update_program", 2),
    "dequant_matmul": ("qmamba.kernels.quant_matmul", "_dequant_matmul_kernel", "dequant_matmul_program", 3),
    "causal_conv1d_update": ("qmamba.kernels.causal_conv1d", "_causal_conv1d_update_kernel",
                             "causal_conv1d_update_program", 2),
}
# per body, the read-only arguments (weights) whose bytes the chain asks L2 for while the previous launch finishes;
# a stacked expert weight (decode_linear with ROUTED) only the slice of the expert that row 0 is routed to
PREFETCHED = {
    "decode_linear": ("w_ptr", "s_ptr", "z_ptr"),
    "add_norm": ("w_ptr", "nb_ptr", "rw_ptr"),
    "dt_state_update": ("wdt_ptr", "dtb_ptr", "a_ptr", "dskip_ptr", "cw_ptr"),
    "dequant_matmul": ("w_ptr", "s_ptr", "z_ptr"),  # (dense launches: ROUTE 0)
    "causal_conv1d_update": ("w_ptr", "b_ptr"),
}
_PF_COLS = 5  # a prefetched range's table columns: address, bytes, bytes a program (set for the grid: see _table),
#               routing-index address (0: none), expert stride
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "launch_cooperative_grid", "maxnreg")
_TL_TYPES = {torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16", torch.float32: "tl.float32",
             torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int16: "tl.int16", torch.int8: "tl.int8",
             torch.uint8: "tl.uint8"}
_HEAD = 4  # table columns before the arguments: kind, grid[1], grid[2], tiles


class UnsupportedLaunch(RuntimeError):
    """What :func:`recording` cannot replay: a kernel without a registered body (or a grid dimension its body does
    not take), PyTorch work inside the recorded code."""


@dataclass
class Launch:
    """One recorded launch: the registered kernel's name, its grid ``(g0, g1, g2)``, and its arguments by parameter
    name (compile-time ones included; the tensors stay alive with the record)."""

    kernel: str
    grid: tuple[int, int, int]
    args: dict

    @property
    def tiles(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class _Recorder:
    def __init__(self, name: str, fn, launches: list):
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = tuple(int(v) for v in (grid(kwargs) if callable(grid) else grid)) + (1, 1)
            if BODIES[self.name][3] < 3 and g[2] != 1:
                raise UnsupportedLaunch(f"{self.name}: a third grid dimension {g[2]} its body does not take")
            names = self.fn.arg_names
            given = dict(zip(names, args))
            given.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
            missing = [n for n in names if n not in given]
            if missing:
                raise UnsupportedLaunch(f"{self.name}: arguments left to their defaults: {missing}")
            bound = {n: given[n] for n in names}  # in the signature's order (the body's, after its program ids)
            self.launches.append(Launch(self.name, g[:3], bound))
        return launch


def _no_tensor_work():
    """A dispatch mode that lets views, metadata and allocations through (an allocated tensor a launch reads or
    writes stays alive in its :class:`Launch`) and refuses any PyTorch op that computes or writes: it would run once
    while recording and never in the replay."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    allowed = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
               aten.new_empty.default, aten.new_empty_strided.default}

    class NoTensorWork(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.is_view or func in allowed:
                return func(*args, **(kwargs or {}))
            raise UnsupportedLaunch(f"{func}: PyTorch work inside a recorded step would not be replayed")

    return NoTensorWork()


@contextmanager
def recording():
    """Inside, launches of the :data:`BODIES` kernels are recorded (the yielded list fills in launch order), not
    run; any other Triton launch, and any PyTorch op other than a view or an allocation, raises
    :class:`UnsupportedLaunch`."""
    if not HAS_TRITON:
        raise UnsupportedLaunch("Triton is not installed")
    launches: list[Launch] = []
    saved = []
    for name, (module, attr, _, _) in BODIES.items():
        mod = importlib.import_module(module)
        real = getattr(mod, attr)
        saved.append((mod, attr, real))
        setattr(mod, attr, _Recorder(name, real, launches))
    from triton.runtime.jit import KernelInterface  # every launchable kernel (JIT, interpreted, autotuned)

    launch_any = KernelInterface.__getitem__

    def refuse(self, grid):
        raise UnsupportedLaunch(f"{getattr(self, '__name__', 'a kernel')}: no registered body to replay it")
    KernelInterface.__getitem__ = refuse
    try:
        with _no_tensor_work():
            yield launches
    finally:
        KernelInterface.__getitem__ = launch_any
        for mod, attr, real in saved:
            setattr(mod, attr, real)


# ---- barrier ---------------------------------------------------------------------------------------------------------
@jit
def grid_arrive(counter_ptr):
    """This program arrives at the grid barrier (release: its writes before the arrival)."""
    tl.debug_barrier()  # every thread's stores before the release
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


TIMED_OUT = 1 << 30  # added to the counter by a program that waited MAX_SPINS: every later barrier opens at once
_TIMED_OUT = tl.constexpr(TIMED_OUT) if HAS_TRITON else TIMED_OUT  # (kernels read constexpr globals only)


@jit
def grid_wait(counter_ptr, target, MAX_SPINS: tl.constexpr = 1 << 22):
    """Wait until the counter reaches ``target`` (acquire: the other programs' writes after it). The counter only
    grows: barrier i of a launch waits for ``(i + 1) * programs``. A program that has polled ``MAX_SPINS`` times
    (seconds: some program of the grid is not running, the grid was larger than what is resident) adds
    :data:`TIMED_OUT` to the counter, so that the launch ends (with wrong results) instead of hanging, and the host
    can tell (:meth:`PersistentChain.timed_out`)."""
    cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (cur < target) & (spins < MAX_SPINS):
        cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if cur < target:
        tl.atomic_add(counter_ptr, _TIMED_OUT, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@jit
def global_time_ns(like):
    """The GPU's global nanosecond timer (``%globaltimer``; ``like``: any scalar, for the shape)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [like], dtype=tl.int64, is_pure=False,
                                     pack=1)


@jit
def prefetch_ranges(cols_ptr, RANGES: tl.constexpr, NT: tl.constexpr):
    """The next launch's prefetch ranges from a table row, read at the start of a launch so that nothing waits for
    them after the barrier's arrival: ``(start, bytes, chunk)`` as ``[NT]`` vectors, thread t holding range t
    (``RANGES`` <= NT of them; the others zero), an expert stack's range moved to the slice of the expert its index
    holds (final by then: the launch that writes the index is not the one that prefetches for its reader)."""
    r = tl.arange(0, NT)
    m = r < RANGES
    base = tl.load(cols_ptr + r * 5, mask=m, other=0)
    nbytes = tl.load(cols_ptr + r * 5 + 1, mask=m, other=0)
    chunk = tl.load(cols_ptr + r * 5 + 2, mask=m, other=0)
    idx_addr = tl.load(cols_ptr + r * 5 + 3, mask=m, other=0)
    expert = tl.maximum(tl.load(idx_addr.to(tl.pointer_type(tl.int32)), mask=idx_addr != 0, other=0), 0)
    return base + expert.to(tl.int64) * tl.load(cols_ptr + r * 5 + 4, mask=m, other=0), nbytes, chunk


@jit
def bulk_prefetch_l2(ptr, size):
    """Hopper's ``cp.async.bulk.prefetch.L2`` of ``size`` bytes at ``ptr`` (an int8 pointer, 16-byte aligned, a
    multiple of 16), elementwise; an element with ``size <= 0`` asks nothing. Nothing to wait for, nothing in
    registers."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, size], dtype=tl.int32, is_pure=False, pack=1)


@jit
def prefetch_share(base, nbytes, chunk, pid):
    """Ask L2 (:func:`bulk_prefetch_l2`) for program ``pid``'s chunk of each range of :func:`prefetch_ranges`
    (``chunk`` bytes, a multiple of 16 sized on the host for the grid), one range a thread: a few instructions
    between arriving at the barrier and waiting."""
    start = pid.to(tl.int64) * chunk
    size = tl.where(base != 0, tl.minimum(tl.maximum(nbytes - start, 0), chunk), 0).to(tl.int32)
    bulk_prefetch_l2(base.to(tl.pointer_type(tl.int8)) + start, size)


# ---- kinds and the table ---------------------------------------------------------------------------------------------
def _classify(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", _TL_TYPES[value.dtype])
    if value is None or isinstance(value, (bool, str)):
        return ("const", repr(value))
    if isinstance(value, int):
        return ("int",)
    if isinstance(value, float):
        return ("float",)
    raise UnsupportedLaunch(f"an argument of type {type(value).__name__}")


@dataclass
class _Kind:
    kernel: str
    key: tuple
    launches: list
    slots: dict          # parameter name -> table column (run-time arguments)
    source_args: list    # the body's arguments after the program ids, as source text


def _kinds(launches: list[Launch]) -> list[_Kind]:
    """Group launches by body and compile-time arguments; per kind, which arguments go through the table."""
    import inspect

    groups: dict[tuple, list[Launch]] = {}
    for launch in launches:
        mod, _, body, _ = BODIES[launch.kernel]
        fn = getattr(importlib.import_module(mod), body)
        constexprs = {p.name for p in inspect.signature(fn.fn).parameters.values()
                      if p.annotation in ("tl.constexpr", tl.constexpr)}
        key = [launch.kernel]
        for name, value in launch.args.items():
            c = _classify(value)
            if name in constexprs:
                key.append((name, "constexpr", repr(value)))
            else:
                key.append((name,) + c)
        groups.setdefault(tuple(key), []).append(launch)
    kinds = []
    for key, group in groups.items():
        slots, source = {}, []
        for entry in key[1:]:
            name, cls = entry[0], entry[1]
            values = [launch.args[name] for launch in group]
            if cls == "constexpr" or cls == "const":
                source.append(entry[2])
            elif cls == "tensor":
                slots[name] = _HEAD + len(slots)
                col = f"row + {slots[name]}"
                ptr = f"tl.load({col}).to(tl.pointer_type({entry[2]}))"
                aligned = all(v.data_ptr() % 16 == 0 for v in values)
                source.append(f"tl.multiple_of({ptr}, 16)" if aligned else ptr)
            elif cls == "int":
                if all(v == values[0] for v in values):
                    source.append(repr(int(values[0])))
                else:
                    slots[name] = _HEAD + len(slots)
                    wide = any(not -2 ** 31 <= v < 2 ** 31 for v in values)
                    val = f"tl.load(row + {slots[name]})" + ("" if wide else ".to(tl.int32)")
                    source.append(f"tl.multiple_of({val}, 16)" if all(v % 16 == 0 for v in values) else val)
            else:  # float
                if all(v == values[0] for v in values):
                    source.append(repr(float(values[0])))
                else:
                    slots[name] = _HEAD + len(slots)
                    source.append(f"tl.load(row + {slots[name]}).to(tl.int32).to(tl.float32, bitcast=True)")
        kinds.append(_Kind(key[0], key, group, slots, source))
    return kinds


def _float_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32).item())


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to just past its last (a strided view's whole extent)."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _prefetch_ranges(launch: Launch) -> list[tuple[int, int, int, int]]:
    """``(address, bytes, routing-index address, expert stride bytes)`` of a launch's :data:`PREFETCHED` tensors
    (distinct tensors; 16-byte aligned starts, lengths rounded down to 16 bytes, as the bulk prefetch needs)."""
    out, seen = [], set()
    routed = launch.kernel == "decode_linear" and bool(launch.args.get("ROUTED"))
    if launch.kernel == "dequant_matmul" and launch.args.get("ROUTE"):
        return out  # (a routed stack on the general kernel: several experts' slices; not asked for)
    for name in PREFETCHED.get(launch.kernel, ()):
        t = launch.args.get(name)
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen or t.data_ptr() % 16:
            continue
        seen.add(t.data_ptr())
        if routed and t.dim() == 3:  # the stack's slice of row 0's expert (16-byte aligned slices only)
            stride = t.stride(0) * t.element_size()
            if stride % 16 == 0:
                out.append((t.data_ptr(), stride, launch.args["rexp_ptr"].data_ptr(), stride))
        else:
            out.append((t.data_ptr(), _span_bytes(t) // 16 * 16, 0, 0))
    return out


def _writes(launch: Launch, address: int) -> bool:
    """Whether ``launch`` writes the routing index at ``address`` (the add + norm kernel's router does)."""
    idx = launch.args.get("idx_ptr") if launch.kernel == "add_norm" and launch.args.get("ROUTER") else None
    return isinstance(idx, torch.Tensor) and idx.data_ptr() == address


def _table(launches: list[Launch], kinds: list[_Kind], ranges: int, programs: int = 1) -> torch.Tensor:
    """A row per launch: kind, grid[1], grid[2], tiles, the kind's run-time arguments, then the prefetch ranges of the
    *next* launch (``ranges`` slots of :data:`_PF_COLS` columns; unused ones zero), each range's bytes split over
    ``programs`` in 16-byte multiples."""
    kind_of = {id(launch): i for i, kind in enumerate(kinds) for launch in kind.launches}
    args = max((len(k.slots) for k in kinds), default=0)
    width = _HEAD + args + ranges * _PF_COLS
    rows = []
    for n, launch in enumerate(launches):
        i = kind_of[id(launch)]
        row = [0] * width
        row[:_HEAD] = [i, launch.grid[1], launch.grid[2], launch.tiles]
        for name, col in kinds[i].slots.items():
            v = launch.args[name]
            row[col] = v.data_ptr() if isinstance(v, torch.Tensor) else _float_bits(v) if isinstance(v, float) \
                else int(v)
        if ranges and n + 1 < len(launches):
            # (an expert slice whose routing index this launch writes is not known yet: not asked for)
            wanted = [r for r in _prefetch_ranges(launches[n + 1]) if not (r[2] and _writes(launch, r[2]))]
            for j, (addr, nbytes, idx_addr, stride) in enumerate(wanted[:ranges]):
                chunk = -(-nbytes // (programs * 16)) * 16
                row[_HEAD + args + j * _PF_COLS:_HEAD + args + (j + 1) * _PF_COLS] = [addr, nbytes, chunk, idx_addr,
                                                                                      stride]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


# ---- the generated kernel --------------------------------------------------------------------------------------------
def _source(kinds: list[_Kind]) -> str:
    """The generated module: per kind a function (not inlined: each compiles on its own, so the compiler cannot
    hoist one kind's constants out of the launch loop and keep them live through the others) that runs one tile of
    a launch of that kind from its table row, then the kernel looping over the launches."""
    imports = sorted({(BODIES[k.kernel][0], BODIES[k.kernel][2]) for k in kinds})  # (module, body)
    lines = ["from qmamba.kernels._triton import jit, tl",
             "from qmamba.kernels.persistent import global_time_ns, grid_arrive, grid_wait, prefetch_ranges, "
             "prefetch_share"]
    lines += [f"from {mod} import {body}" for mod, body in imports]
    for i, kind in enumerate(kinds):
        _, _, body, n_pids = BODIES[kind.kernel]
        names = [entry[0] for entry in kind.key[1:]]
        pids = ["t // g1", "t % g1"] if n_pids == 2 else ["t // (g1 * g2)", "(t // g2) % g1", "t % g2"]
        lines += ["", "", "@jit(noinline=True)", f"def kind_{i}(t, g1, g2, row):", f"    {body}("]
        lines += [f"        {pid}," for pid in pids]
        lines += [f"        {arg},  # {name}" for name, arg in zip(names, kind.source_args)]
        lines += ["    )"]
    # (N_OPS and NPROG unspecialised: the grid-sizing compile at NPROG = 1 is the kernel that runs)
    lines += ["", "", '@jit(do_not_specialize=["N_OPS", "NPROG"])',
              "def persistent_chain(tab_ptr, counter_ptr, times_ptr, N_OPS, NPROG, ROW: tl.constexpr,",
              "                     PF_COL: tl.constexpr, PF_RANGES: tl.constexpr, NT: tl.constexpr,",
              "                     TIMELINE: tl.constexpr):",
              "    pid = tl.program_id(0)",
              "    if TIMELINE:  # program 0's clock at the start and as each barrier opens",
              "        if pid == 0:",
              "            tl.store(times_ptr, global_time_ns(pid))",
              "    # each launch's header (kind, grid, tiles) is read before the barrier that opens it (the acquire",
              "    # empties L1: read after it, the header would cost one more L2 round trip a launch)",
              "    kind = tl.load(tab_ptr)",
              "    g1 = tl.load(tab_ptr + 1).to(tl.int32)",
              "    g2 = tl.load(tab_ptr + 2).to(tl.int32)",
              "    tiles = tl.load(tab_ptr + 3).to(tl.int32)",
              "    for op in range(N_OPS):",
              "        row = tab_ptr + op * ROW",
              "        if PF_RANGES > 0:  # the next launch's ranges, read now: nothing waits for them after arriving",
              "            pf_base, pf_bytes, pf_chunk = prefetch_ranges(row + PF_COL, PF_RANGES, NT)"]
    for i in range(len(kinds)):
        lines += [f"        if kind == {i}:",
                  "            for t in range(pid, tiles, NPROG):",
                  f"                kind_{i}(t, g1, g2, row)"]
    lines += ["        if op + 1 < N_OPS:",
              "            grid_arrive(counter_ptr)",
              "            if PF_RANGES > 0:  # the next launch's weights, asked of L2 while the others finish",
              "                prefetch_share(pf_base, pf_bytes, pf_chunk, pid)",
              "            kind = tl.load(row + ROW)",
              "            g1 = tl.load(row + ROW + 1).to(tl.int32)",
              "            g2 = tl.load(row + ROW + 2).to(tl.int32)",
              "            tiles = tl.load(row + ROW + 3).to(tl.int32)",
              "            grid_wait(counter_ptr, (op + 1) * NPROG)",
              "        if TIMELINE:",
              "            if pid == 0:",
              "                tl.store(times_ptr + op + 1, global_time_ns(pid))", ""]
    return "\n".join(lines)


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


_GENERATED: dict[str, object] = {}


def _kernel_for(source: str):
    """The ``persistent_chain`` kernel of a generated source (compiled once per distinct source)."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    if digest not in _GENERATED:
        filename = f"<qmamba-persistent-chain-{digest}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for inspect.getsource
        namespace = {"__name__": f"qmamba_persistent_{digest}"}
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated source
        _GENERATED[digest] = namespace["persistent_chain"]
    return _GENERATED[digest]


class PersistentChain:
    """Recorded launches (:func:`recording`) as one persistent launch; see the module docstring. ``programs``:
    the grid (default: one on CPU, on CUDA as many as are resident at once, at most the largest launch's)."""

    def __init__(self, launches: list[Launch], device, programs: int | None = None, num_warps: int = 4,
                 prefetch: bool | None = None, maxnreg: int = 0):
        if not launches:
            raise ValueError("PersistentChain: no launches")
        self.launches = launches
        self.kinds = _kinds(launches)
        self.source = _source(self.kinds)
        self.kernel = _kernel_for(self.source)
        self.device = torch.device(device)
        if prefetch is None:  # the bulk prefetch is Hopper's (sm_90) and compiled code's (not the interpreter's)
            prefetch = self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9
        self.ranges = min(max(len(_prefetch_ranges(launch)) for launch in launches), 32 * num_warps) \
            if prefetch else 0
        self.args_width = max((len(k.slots) for k in self.kinds), default=0)
        self.table = _table(launches, self.kinds, self.ranges).to(self.device)  # (the grid's chunks below)
        self.counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.num_warps = num_warps
        self.maxnreg = maxnreg if maxnreg and self.device.type == "cuda" else 0  # (the interpreter takes none)
        self.max_tiles = max(launch.tiles for launch in launches)
        self.programs = programs if programs is not None else self.programs_for(self.device)
        if self.ranges:
            self.table = _table(launches, self.kinds, self.ranges, self.programs).to(self.device)

    def _launch_args(self, programs: int, times: torch.Tensor | None = None):
        return (self.table, self.counter, times if times is not None else self.counter, len(self.launches),
                programs), dict(ROW=self.table.shape[1], PF_COL=_HEAD + self.args_width, PF_RANGES=self.ranges,
                                NT=32 * self.num_warps, TIMELINE=times is not None, num_warps=self.num_warps,
                                **(dict(maxnreg=self.maxnreg) if self.maxnreg else {}))

    def programs_for(self, device) -> int:
        """One on CPU; on CUDA the programs resident at once by the compiled kernel's registers, shared memory and
        threads (a barrier over more would never open), capped at the largest launch's tile count."""
        if device.type != "cuda":
            return 1
        args, meta = self._launch_args(1)
        resident = resident_programs(self.kernel.warmup(*args, grid=(1,), **meta), self.num_warps, device)
        if resident < 1:
            raise UnsupportedLaunch("PersistentChain: one program does not fit a multiprocessor")
        return min(resident, self.max_tiles)

    def timed_out(self) -> bool:
        """Whether the last run's barriers timed out (a host synchronisation): its grid was not all resident at
        once, and its results are wrong."""
        return int(self.counter.item()) >= TIMED_OUT

    def __call__(self):
        """Run the chain once (the counter is zeroed first, as part of the same stream's work)."""
        self.counter.zero_()
        args, meta = self._launch_args(self.programs)
        self.kernel[(self.programs,)](*args, **meta)

    def timeline(self) -> list[float]:
        """Run the chain once (CUDA; a variant compiled with clock reads) and return each launch's phase in
        microseconds as program 0 saw it: from the barrier that opened it to the one that closed it (the last: to
        program 0's own end). A profile of the chain, one host synchronisation."""
        if self.device.type != "cuda":
            raise ValueError("PersistentChain.timeline: CUDA only (it reads the GPU's timer)")
        times = torch.zeros(len(self.launches) + 1, dtype=torch.int64, device=self.device)
        self.counter.zero_()
        args, meta = self._launch_args(self.programs, times)
        self.kernel[(self.programs,)](*args, **meta)
        ns = times.tolist()
        return [(b - a) / 1e3 for a, b in zip(ns, ns[1:])]


__all__ = ["BODIES", "PREFETCHED", "TIMED_OUT", "Launch", "PersistentChain", "UnsupportedLaunch", "bulk_prefetch_l2",
           "global_time_ns", "grid_arrive", "grid_wait", "prefetch_ranges", "prefetch_share", "recording",
           "resident_programs"]
