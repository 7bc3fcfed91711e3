"""The method registry: the CLI and recipes accept exactly its selectable methods; each method quantizes a matrix
as its own algorithm does, and falls back to the format's data-free initialisation (RTN, PTB for 1 bit) when it
cannot run; the registry is readable without importing torch (the CLI loads it at start)."""

import subprocess
import sys

import pytest
import torch

from qmamba.calib.awq import quantize_with_clip, search_clip
from qmamba.calib.gptq import HessianAccumulator, gptq_quantize
from qmamba.calib.methods import METHODS, SELECTABLE_METHODS, data_free_method
from qmamba.calib.pipeline import CalibOptions, _InputCapture, quantize_matrix
from qmamba.calib.recipe import RecipeError, validate_recipe
from qmamba.quant.formats import BinaryFormat, Int4Format, Int8Format


def test_selectable_methods_are_the_cli_and_recipe_choices():
    from qmamba.cli.quantize import quantize

    choice = next(p for p in quantize.params if p.name == "method").type
    assert tuple(choice.choices) == SELECTABLE_METHODS == ("rtn", "gptq", "awq")
    for name in SELECTABLE_METHODS:
        validate_recipe({"rules": [{"pattern": "*", "method": name}]})
    with pytest.raises(RecipeError, match="method must be one of"):
        validate_recipe({"default": {"method": "ptb"}})  # chosen by the binary format, never by hand
    assert set(METHODS) == {"rtn", "gptq", "awq", "ptb"}


def _capture(x, hessian=True):
    cap = _InputCapture(x.shape[-1], hessian, 1, x.device)
    if x.shape[0]:
        cap.add(x)
    return cap


@pytest.mark.parametrize("fmt", [Int8Format(), Int4Format(32)])
def test_each_method_runs_its_algorithm_or_falls_back(fmt):
    torch.manual_seed(0)
    W, x = torch.randn(24, 64), torch.randn(200, 64) * torch.linspace(0.1, 3, 64)
    opts = CalibOptions()
    rtn_q = fmt.quantize(W, *fmt.params(W))
    q, s, z, how = quantize_matrix(W, fmt, "rtn", _capture(x), opts, x)
    assert how == "rtn" and torch.equal(q, rtn_q)
    q, s, z, how = quantize_matrix(W, fmt, "gptq", _capture(x), opts, x)
    H = HessianAccumulator(64, x.device)
    H.add(x)
    assert how == "gptq" and torch.equal(q, gptq_quantize(W, H.hessian(), fmt, opts.block_size, opts.damp)[0])
    q, s, z, how = quantize_matrix(W, fmt, "awq", _capture(x, hessian=False), opts, x)
    assert how == "awq" and torch.equal(q, quantize_with_clip(W, search_clip(W, x, fmt, opts.awq_grid), fmt)[0])
    # no calibration tokens: both fall back to round to nearest
    empty = torch.zeros(0, 64)
    for method in ("gptq", "awq"):
        q, s, z, how = quantize_matrix(W, fmt, method, _capture(empty), opts, empty)
        assert how == "rtn" and torch.equal(q, rtn_q)


def test_binary_format_uses_ptb_whatever_the_method():
    torch.manual_seed(1)
    fmt, W, x = BinaryFormat(), torch.randn(16, 40), torch.randn(50, 40)
    assert data_free_method(fmt) == "ptb" and data_free_method(Int8Format()) == "rtn"
    expected = fmt.quantize_rtn(W)
    for method in ("ptb", "rtn"):
        q, s, z, how = quantize_matrix(W, fmt, method, _capture(x), CalibOptions(), x)
        assert how == "ptb"
        packed = fmt.from_codes(q, s, z)
        assert all(torch.equal(packed[k], expected[k]) for k in expected)


def test_registry_imports_without_torch():
    code = "import sys, qmamba.calib.methods; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
