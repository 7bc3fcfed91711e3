"""The import graph of the ``qmamba`` package, read from the source with ``ast`` (lazy imports inside functions
count too): one-way, no circles; the runtime imports neither ``qmamba.calib`` nor ``qmamba.export`` (the CLI, the
thin layer over every library function, is the one place above both); the kernels import only torch, triton,
numpy, the standard library, other kernel modules and the packed layouts (``qmamba.quant.layout``), and take
tensors and weight records, never model modules (no ``torch.nn`` but ``torch.nn.functional``).

The checks are tried on small hand-made graphs first, so a broken graph reader cannot pass them silently."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "qmamba"
OPTIONAL = ("qmamba.calib", "qmamba.export", "qmamba.cli")  # everything else is the runtime
KERNEL_ALLOWED_THIRD_PARTY = ("torch", "triton", "numpy")
KERNEL_ALLOWED_QMAMBA = ("qmamba.kernels", "qmamba.quant.layout")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of ``package`` below ``root``."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module ``source`` imports (absolute names); ``from pkg import name`` names ``pkg.name`` when that is a
    module of ``known``, else ``pkg``."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            if base == "__future__":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every module of ``package`` (edges to outside modules included)."""
    files = package_modules(root, package)
    known = set(files)
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (or a module
    importing itself), each sorted; Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    work: list = []  # (node, iterator over its children) of the depth-first walk
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted(graph[node] & graph.keys()))))

    for start in sorted(graph):
        if start in index:
            continue
        visit(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    visit(child)
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def forbidden_runtime_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Runtime modules (not calib/export/cli) that import calib or export."""
    bad = {}
    for module, targets in graph.items():
        if within(module, OPTIONAL):
            continue
        hits = sorted(t for t in targets if within(t, ("qmamba.calib", "qmamba.export")))
        if hits:
            bad[module] = hits
    return bad


def forbidden_kernel_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Kernel modules importing anything but torch, triton, numpy, the standard library, kernels and the layouts."""
    bad = {}
    for module, targets in graph.items():
        if not within(module, ("qmamba.kernels",)):
            continue
        hits = sorted(t for t in targets
                      if not (t.split(".")[0] in sys.stdlib_module_names
                              or within(t, KERNEL_ALLOWED_THIRD_PARTY) or within(t, KERNEL_ALLOWED_QMAMBA)))
        if hits:
            bad[module] = hits
    return bad


def module_imports(source: str) -> list[str]:
    """Where ``source`` reaches for ``torch.nn``'s modules: ``from torch import nn``, ``import torch.nn``,
    ``from torch.nn import ...`` (``torch.nn.functional`` is tensor functions and allowed) or a name ``nn.Module``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module == "torch":
                hits += [f"from torch import {a.name}" for a in node.names if a.name == "nn"]
            elif node.module == "torch.nn":
                hits += [f"from torch.nn import {a.name}" for a in node.names if a.name != "functional"]
            elif (node.module or "").startswith("torch.nn.") and node.module != "torch.nn.functional":
                hits.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            hits += [f"import {a.name}" for a in node.names
                     if a.name == "torch.nn" or (a.name.startswith("torch.nn.") and a.name != "torch.nn.functional")]
        elif isinstance(node, ast.Attribute) and node.attr == "Module":
            hits.append("nn.Module")
    return hits


# ---- the checks on hand-made graphs -----------------------------------------------------------------------
def test_cycles_found_in_small_graphs():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    three = cycles({"f": {"b", "torch"}, "b": {"m"}, "m": {"f"}, "x": {"f"}})
    assert three == [["b", "f", "m"]]
    two = cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}})
    assert sorted(two) == [["a", "b"], ["c", "d"]]


def test_cycles_match_brute_force_reachability():
    """On random graphs: the circles are the sets of modules that reach each other (and self-importers)."""
    import random

    for seed in range(200):
        rng = random.Random(seed)
        nodes = [f"m{i}" for i in range(rng.randint(1, 8))]
        graph = {a: {b for b in nodes if rng.random() < 0.25} | {"torch"} for a in nodes}

        def reachable(a):
            seen, todo = set(), [a]
            while todo:
                for b in graph[todo.pop()] & set(nodes):
                    if b not in seen:
                        seen.add(b)
                        todo.append(b)
            return seen

        reach = {a: reachable(a) for a in nodes}
        expected = {tuple(sorted({a} | {b for b in reach[a] if a in reach[b]}))
                    for a in nodes if a in reach[a]}
        assert {tuple(c) for c in cycles(graph)} == expected, seed


def test_graph_reader_resolves_relative_and_lazy_imports():
    known = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}
    source = ("from __future__ import annotations\nimport os\nfrom . import a\nfrom .c import thing\n"
              "def f():\n    from ..b import g\n    import torch.nn\n")
    assert imports_of(source, "p.sub.x", False, known) == {"os", "p.sub", "p.sub.c", "p.b", "torch.nn"}
    assert imports_of("from . import a, missing\n", "p", True, known) == {"p.a", "p"}


def test_layer_rules_flag_bad_edges():
    graph = {"qmamba.model": {"qmamba.calib.gptq"}, "qmamba.cli.quantize": {"qmamba.calib.quantize"},
             "qmamba.kernels.k": {"torch", "math", "numpy", "qmamba.quant.layout", "qmamba.quant.modules", "onnx",
                                  "qmamba.moe"}}
    assert forbidden_runtime_imports(graph) == {"qmamba.model": ["qmamba.calib.gptq"]}
    assert forbidden_kernel_imports(graph) == {"qmamba.kernels.k": ["onnx", "qmamba.moe", "qmamba.quant.modules"]}


def test_module_imports_found():
    bad = ("from torch import nn, Tensor\nimport torch.nn\nfrom torch.nn import Module, functional\n"
           "def f(m: torch.nn.Module): pass\n")
    assert module_imports(bad) == ["from torch import nn", "import torch.nn", "from torch.nn import Module",
                                   "nn.Module"]
    assert module_imports("import torch.nn.functional as F\nfrom torch import Tensor\n"
                          "from torch.nn import functional as F2\n") == []


# ---- the checks on qmamba ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    g = import_graph()
    assert {"qmamba.model", "qmamba.kernels.weights", "qmamba.calib.pipeline"} <= set(g)
    assert "qmamba.quant.layout" in g["qmamba.kernels.weights"]  # the reader sees the real edges
    return g


def test_no_import_circles(graph):
    assert cycles(graph) == []


def test_runtime_imports_neither_calib_nor_export(graph):
    assert forbidden_runtime_imports(graph) == {}


def test_kernels_import_only_torch_triton_and_the_layouts(graph):
    assert forbidden_kernel_imports(graph) == {}


def test_kernels_take_no_model_modules():
    """Kernels take tensors and weight records: no kernel file reaches for ``torch.nn`` modules (the MoE kernels
    used to be handed the model's ``SwitchMoE`` and read ``.router`` / ``.experts`` from it)."""
    files = package_modules(ROOT)
    bad = {name: hits for name, path in files.items() if within(name, ("qmamba.kernels",))
           and (hits := module_imports(path.read_text(encoding="utf-8")))}
    assert bad == {}
