"""torch's CPU int4 matmul for int4 linears (issue 15, item 4: int4 CPU decode within 2x of the ONNX export; the
dense cache only reaches the float model's speed). The packed operands are checked against the weights that
qmamba's own dequantization gives, computed independently in float64 from the activations rounded to bfloat16;
modules the kernel cannot take keep the exact dense cache; ``load_model(cpu_int4=True)`` uses it and stays close
to the exact path."""

from pathlib import Path

import pytest
import torch
from torch import nn

from qmamba.checkpoints.load import load_model
from qmamba.checkpoints.native import save_checkpoint
from qmamba.config import ModelConfig
from qmamba.quant.formats import Int4Format, Int8Format
from qmamba.quant.modules import (QuantExperts, QuantLinear, cpu_int4_available, cpu_int4_module_names,
                                  cpu_int4_operands, keep_dense_weights)
from qmamba.testing import quantize_rtn, random_model

pytestmark = pytest.mark.skipif(not cpu_int4_available(), reason="this torch has no CPU int4 matmul")


def quant_linear(n, k, fmt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
    return QuantLinear.from_linear(linear, fmt)


@pytest.mark.parametrize("group_size,symmetric,n,k", [(32, False, 40, 64), (64, False, 48, 128),
                                                      (128, True, 24, 256), (256, False, 16, 512)])
def test_cpu_int4_matmul_matches_the_dequantized_weights(group_size, symmetric, n, k):
    mod = quant_linear(n, k, Int4Format(group_size=group_size, symmetric=symmetric))
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    expected = x.to(torch.bfloat16).double() @ mod.dequantized_weight(torch.float64).T  # independent of the kernel
    assert mod.keep_cpu_int4(torch.float32) > 0
    y = mod(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    # the kernel keeps scales and offsets in bfloat16 and returns bfloat16: errors of a few 2**-8 of |x| |W|
    bound = (x.abs().double() @ mod.dequantized_weight(torch.float64).abs().T) * 2**-6 + 1e-6
    assert ((y.double() - expected).abs() <= bound).all()
    assert (y.double() - expected).norm() / expected.norm() < 1e-2


def test_cpu_int4_matmul_takes_a_strided_bfloat16_input():
    """A column slice in bfloat16 (x_proj's input in a bfloat16 model: the conv output's half of in_proj's) is not
    contiguous, and the CPU kernel refuses such an input: it is copied first."""
    mod = quant_linear(40, 64, Int4Format(group_size=32))
    xz = torch.randn(5, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x = xz[:, :64]
    assert not x.is_contiguous() and mod.keep_cpu_int4(torch.bfloat16) > 0
    torch.testing.assert_close(mod(x), mod(x.contiguous()), rtol=0, atol=0)


def test_operands_are_smaller_than_the_dense_copy():
    mod = quant_linear(64, 256, Int4Format(group_size=64))
    kept = mod.keep_cpu_int4(torch.float32)
    assert kept < 64 * 256 * 4 / 6  # int4 codes (1/2 byte) + bf16 scale and offset per group, against 4 bytes


@pytest.mark.parametrize("fmt,k", [(Int4Format(group_size=16), 64), (Int8Format(), 64),
                                   (Int4Format(group_size=64), 96)])  # 96 is not a whole number of groups
def test_modules_the_kernel_cannot_take_keep_the_exact_dense_cache(fmt, k):
    mod = quant_linear(32, k, fmt)
    assert cpu_int4_operands(mod.fmt, mod.packed(), 32, k) is None
    assert mod.keep_cpu_int4(torch.float32) == 0
    model = nn.Sequential(mod)
    assert keep_dense_weights(model, torch.float32, cpu_int4=True) == 32 * k * 4  # the dense copy instead
    assert cpu_int4_module_names(model) == []
    x = torch.randn(2, k)
    torch.testing.assert_close(mod(x), x @ mod.dequantized_weight().T, rtol=0, atol=1e-5)


def test_changed_weights_are_never_served_stale():
    mod = quant_linear(32, 64, Int4Format(group_size=32))
    mod.keep_cpu_int4(torch.float32)
    with torch.no_grad():
        mod.scales.mul_(2)
    x = torch.randn(2, 64)
    torch.testing.assert_close(mod(x), x @ mod.dequantized_weight().T, rtol=1e-5, atol=1e-5)  # the exact path


def test_load_model_with_cpu_int4(tmp_path):
    cfg = ModelConfig(d_model=64, layers=["r", "4", "r"], vocab_size=200, ffn_hidden=64, d_state=4,
                      final_norm="layernorm")
    model = quantize_rtn(random_model(cfg, seed=3), Int4Format(group_size=32), head=True)
    quantization, linears = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            quantization[name] = {**mod.fmt.to_dict(), "method": "rtn"}
            linears += [name] if mod.in_features % 32 == 0 else []  # dt_proj (k = dt_rank = 4) is too narrow
        elif isinstance(mod, QuantExperts):
            quantization.update({f"{name}.{w}": {**getattr(mod, w).fmt.to_dict(), "method": "rtn"}
                                 for w in ("fc1", "fc2")})
    save_checkpoint(model, cfg, tmp_path / "q", quantization=quantization)
    exact = load_model(tmp_path / "q")
    fast = load_model(tmp_path / "q", cpu_int4=True)
    assert exact.cpu_int4_modules == []
    assert sorted(fast.cpu_int4_modules) == sorted(linears) and "lm_head" in linears  # experts: dense cache
    assert fast.dense_cache_bytes < exact.dense_cache_bytes
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = exact(ids), fast(ids)
    # per position; the median, since a near-tie of the top-1 router can send a token to another expert (then
    # that position and a few after it differ by the expert's output, as any rounding change would)
    errors = (a - b).norm(dim=-1) / a.norm(dim=-1)
    assert errors.median() < 2e-2, errors
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_generate_on_cpu_runs_the_int4_matmul(tmp_path):
    import json

    from click.testing import CliRunner

    import qmamba
    from qmamba.cli import main

    fixture = Path(qmamba.__file__).parent / "assets" / "tiny-blackmamba"
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", str(fixture), "-o", str(tmp_path / "q"), "--bits", "4", "--method",
                                  "rtn", "--group-size", "64", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["generate", str(tmp_path / "q"), "--prompt", "And the", "-n", "8", "-t", "0",
                                  "--device", "cpu", "--json", str(tmp_path / "g.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "g.json").read_text())
    mamba_layers = sum(1 for code in json.loads((fixture / "config.json").read_text())["layers"] if code == "r")
    assert record["cpu_int4_modules"] == 2 * mamba_layers  # in_proj and out_proj of every Mamba layer
    assert record["new_tokens"] == 8
