"""Rules on the Triton sources that neither the interpreter nor this machine's Triton enforce.

A ``@jit`` function's string-valued default (``CACHE: tl.constexpr = ""``) compiles with Triton 3.9 and runs in the
interpreter, but Triton 3.6 (the GPU image's) fails to compile a call of a device function that leaves it at its
default: ``AttributeError("'str' object has no attribute 'type'")``. Session 48's int8 quantizer did that, and every
batch-2+ step with int8 activations failed on the GPU. A flag, passed by every caller, serves instead."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[3] / "qmamba" / "kernels"


def string_defaults(source: str) -> list[str]:
    """``function.parameter`` of each ``@jit`` / ``@triton.jit`` function parameter with a string default."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef):
            continue
        if not any((isinstance(d, ast.Name) and d.id == "jit") or (isinstance(d, ast.Attribute) and d.attr == "jit")
                   for d in node.decorator_list):
            continue
        params = node.args.posonlyargs + node.args.args
        pairs = list(zip(params[len(params) - len(node.args.defaults):], node.args.defaults))
        pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
        found += [f"{node.name}.{a.arg}" for a, d in pairs if isinstance(d, ast.Constant) and isinstance(d.value, str)]
    return found


def test_the_rule_sees_a_string_default():
    source = '@jit\ndef load_row(x_ptr, n, CACHE: tl.constexpr = "", FLAG: tl.constexpr = False):\n    pass\n'
    assert string_defaults(source) == ["load_row.CACHE"]
    assert string_defaults(source.replace("@jit", "@triton.jit")) == ["load_row.CACHE"]
    assert string_defaults(source.replace("@jit\n", "")) == []  # (plain Python functions may)


def test_no_jit_function_has_a_string_default():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) > 10
    found = {p.name: string_defaults(p.read_text()) for p in files}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
