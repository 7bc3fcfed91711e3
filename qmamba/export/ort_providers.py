"""Which onnxruntime execution provider runs an exported model, the CUDA libraries it needs, and where the nodes of
a session actually ran.

    providers = session_providers(ort, "cuda:0", cuda_graph=False)   # ProviderError when CUDA is not there
    preload_cuda_libraries(ort)        # the CUDA 12/13 libraries of the nvidia-* wheels (torch's), when present
    placement = NodePlacement.from_profile(session.end_profiling())
    print(placement.describe())        # "CUDAExecutionProvider 410 nodes; CPUExecutionProvider 12 nodes (Shape x9..."

onnxruntime-gpu >= 1.27 on PyPI is built for CUDA 13 (1.25/1.26: CUDA 12) and links cuBLAS, cuBLASLt, cuRAND and
the CUDA runtime (cuFFT, NVRTC and cuDNN are opened when first needed) without a search path of its own: they must
be loadable already. A CUDA build of torch from PyPI installs exactly these libraries (``nvidia/cu13/lib``,
``nvidia/cudnn/lib`` in site-packages), so :func:`preload_cuda_libraries` loads them from there, globally, before
the first CUDA session. onnxruntime's own ``preload_dlls()`` looks only beside the onnxruntime package, which misses
them when onnxruntime-gpu is installed elsewhere (``pip install --target``).

Node placement: onnxruntime has no API that lists the provider of each node, but its profiler records the provider
of every node it runs. :class:`OrtLM <qmamba.export.ort_runner.OrtLM>` profiles its first call only (then ends
profiling) and reads the placement from that record. onnxruntime puts small shape computations (``Shape``,
``Gather`` on shapes, ...) on the CPU on purpose; ``Memcpy*`` nodes are the copies between host and device that a
node placed on the other side costs, so CPU nodes without copy nodes are shape computations only (no warning).
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qmamba.errors import UserError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

# soname majors of the libraries onnxruntime-gpu's CUDA provider loads, by the CUDA major version it was built for
# (dependencies first: cuBLAS needs cuBLASLt)
CUDA_LIBRARIES = {
    12: ("libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12", "libcurand.so.10", "libcufft.so.11",
         "libnvrtc.so.12", "libcudnn.so.9"),
    13: ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12",
         "libnvrtc.so.13", "libcudnn.so.9"),
}


class ProviderError(UserError):
    """The requested execution provider is not available, or did not start."""


def ort_cuda_version(ort) -> str:
    """The CUDA version onnxruntime was built for (``"13.0"``), ``""`` for a CPU build."""
    try:
        from onnxruntime.capi import build_and_package_info as info  # noqa: PLC0415
    except ImportError:
        return ""
    return str(getattr(info, "cuda_version", "") or "")


def nvidia_library_dirs() -> list[Path]:
    """The ``lib`` folders of the nvidia-* wheels on ``sys.path`` (CUDA 13: one shared ``nvidia/cu13/lib``; CUDA 12:
    one folder per library; cuDNN: ``nvidia/cudnn/lib``)."""
    dirs: list[Path] = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if not root.is_dir():
            continue
        for lib in sorted(root.glob("*/lib")):
            if lib.is_dir() and lib.resolve() not in [d.resolve() for d in dirs]:
                dirs.append(lib)
    return dirs


def preload_cuda_libraries(ort) -> list[str]:
    """Load, with global symbol visibility, the CUDA libraries onnxruntime's CUDA provider needs from the nvidia-*
    wheels when they are there (see module doc); returns the files loaded. Nothing happens for a CPU build or
    when no wheel folder holds them (the system's libraries, ``LD_LIBRARY_PATH``, are used then)."""
    version = ort_cuda_version(ort)
    try:
        names = CUDA_LIBRARIES[int(version.split(".")[0])]
    except (KeyError, ValueError):
        return []
    loaded = []
    dirs = nvidia_library_dirs()
    for name in names:
        for folder in dirs:
            path = folder / name
            if path.is_file():
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                    loaded.append(str(path))
                except OSError:
                    continue  # a broken copy: the loader's own search may still find a good one
                break
    return loaded


def device_index(device: str) -> int:
    text = str(device)
    return int(text.split(":", 1)[1]) if ":" in text else 0


def cuda_provider_options(device: str, cuda_graph: bool = False, tf32: bool = False) -> dict:
    """Options of the CUDA provider: the device, CUDA graph capture, TF32 (off: fp32 graphs stay fp32)."""
    options = {"device_id": str(device_index(device)), "use_tf32": "1" if tf32 else "0",
               "arena_extend_strategy": "kSameAsRequested"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def session_providers(ort, device: str, cuda_graph: bool = False) -> list:
    """The ``providers`` argument of an ``InferenceSession`` for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Raises :class:`ProviderError` (one line) when CUDA is asked for and this onnxruntime has no CUDA provider, and
    when CUDA graphs are asked for on the CPU."""
    if not str(device).startswith("cuda"):
        if cuda_graph:
            raise ProviderError("CUDA graph capture needs --device cuda")
        return [CPU_EP]
    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise ProviderError(
            f"onnxruntime {ort.__version__} here has no CUDA execution provider (it has: {', '.join(available)}): "
            "install onnxruntime-gpu in place of onnxruntime (pip install 'qmamba[gpu]'), or run with --device cpu")
    preload_cuda_libraries(ort)
    return [(CUDA_EP, cuda_provider_options(device, cuda_graph)), CPU_EP]


@dataclass
class NodePlacement:
    """Nodes run in one profiled call, by provider and op type (``{provider: {op_type: count}}``)."""

    nodes: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_profile(cls, path) -> "NodePlacement":
        """Read an onnxruntime profile (``session.end_profiling()``'s file): each node once, by its name."""
        events = json.loads(Path(path).read_text(encoding="utf-8"))
        seen: dict[str, tuple[str, str]] = {}
        for event in events:
            args = event.get("args") or {}
            if event.get("cat") == "Node" and "provider" in args and str(event.get("name", "")).endswith(
                    "_kernel_time"):
                seen[event["name"][:-len("_kernel_time")]] = (args["provider"], args.get("op_name", "?"))
        nodes: dict[str, Counter] = {}
        for provider, op in seen.values():
            nodes.setdefault(provider, Counter())[op] += 1
        return cls({p: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for p, c in sorted(nodes.items())})

    def count(self, provider: str | None = None) -> int:
        return sum(sum(ops.values()) for p, ops in self.nodes.items() if provider in (None, p))

    def elsewhere(self, provider: str) -> dict[str, int]:
        """Op types (with counts) of the nodes that ran on any other provider than ``provider``."""
        out: Counter = Counter()
        for p, ops in self.nodes.items():
            if p != provider:
                out.update(ops)
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def copies(self) -> int:
        """Host <-> device copy nodes (``MemcpyToHost`` / ``MemcpyFromHost``) run per call."""
        return sum(n for ops in self.nodes.values() for op, n in ops.items() if op.startswith("Memcpy"))

    def describe(self) -> str:
        parts = []
        for provider, ops in self.nodes.items():
            listed = ", ".join(f"{op} x{n}" for op, n in ops.items())
            parts.append(f"{provider} {sum(ops.values())} nodes ({listed})")
        return "; ".join(parts) + f"; {self.copies} host<->device copies per call"

    def warning(self, provider: str = CUDA_EP) -> str | None:
        """A one-line warning when nodes ran off ``provider`` and data crossed between host and device for them;
        ``None`` when all ran on it, or when the others are only the shape computations onnxruntime keeps on the
        CPU on purpose (no copy nodes: their inputs and outputs never leave the host)."""
        off = self.elsewhere(provider)
        if not off or self.copies == 0:
            return None
        listed = ", ".join(f"{op} x{n}" for op, n in off.items())
        return (f"warning: {sum(off.values())} of {self.count()} nodes run outside {provider} ({listed}), with "
                f"{self.copies} host<->device copies per call")

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "copies": self.copies}
