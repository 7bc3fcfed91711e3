"""1-bit (binary) modules exported as exact 2-bit MatMulNBits (+/-1 = codes 1/3 against zero point 2; the row
scale, if any, as the block scales) plus the alpha Mul and the beta reduction, against the PyTorch reference;
the 2-bit packing against an independent decoder."""

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export_helpers import rel_err, tiny_state_dict, torch_model  # noqa: E402

from qmamba.export.exporter import export_model  # noqa: E402
from qmamba.export.graph import ExportOptions  # noqa: E402
from qmamba.export.ort_runner import OrtLM  # noqa: E402
from qmamba.quant.binary import BinaryExperts, BinaryFormat, BinaryLinear, binary_as_matmul_nbits  # noqa: E402


@pytest.mark.parametrize("k,block", [(64, 16), (40, 16), (4, 16)])
def test_int2_codes_decode_to_signs(k, block):
    fmt = BinaryFormat(row_scale=True)
    W = torch.randn(6, k)
    packed = fmt.quantize_rtn(W)
    codes, scales = binary_as_matmul_nbits(packed, k, block)
    assert codes.shape == (6, -(-k // block), block // 4) and codes.dtype == torch.uint8
    flat = codes.reshape(6, -1).to(torch.int32)
    q = torch.stack([(flat >> (2 * j)) & 3 for j in range(4)], dim=-1).reshape(6, -1)  # low bits first
    s = (q - 2).float() * scales.repeat_interleave(block, dim=1)
    W_hat = fmt.dequantize(packed, k)
    ref = (W_hat / packed["row_scale"].float()[:, None] - packed["beta"].float()) / packed["alpha"].float()
    torch.testing.assert_close(s[:, :k], ref * packed["row_scale"].float()[:, None], atol=1e-3, rtol=1e-3)
    assert bool((q[:, k:] == 2).all())  # padded tail: exactly zero


def binarized(row_scale: bool):
    cfg, sd = tiny_state_dict("tiny-blackmamba")
    model = torch_model(cfg, sd)
    fmt = BinaryFormat(row_scale)
    entries = {}
    for block in model.blocks:
        mixer, i = block.mixer, block.index
        if block.is_mamba:
            for leaf in ("in_proj", "x_proj", "dt_proj", "out_proj"):  # dt_proj: K = 4, a padded 2-bit block
                setattr(mixer, leaf, BinaryLinear.from_linear(getattr(mixer, leaf), fmt))
                entries[f"layers.{i}.mixer.{leaf}"] = fmt.to_dict()
        else:
            mixer.experts = BinaryExperts.from_stacked(mixer.experts, fmt, fmt)
            entries.update({f"layers.{i}.mixer.experts.{w}": fmt.to_dict() for w in ("fc1", "fc2")})
    qsd = {k: v.clone() for k, v in model.state_dict().items()}
    manifest = {"quantization": entries}
    return cfg, qsd, manifest, torch_model(cfg, qsd, manifest)


@pytest.mark.parametrize("row_scale", [False, True], ids=["plain", "rowscale"])
def test_binary_export_matches_pytorch(tmp_path, row_scale):
    cfg, qsd, manifest, model = binarized(row_scale)
    summary = export_model(cfg, qsd, manifest, tmp_path / "b.onnx", ExportOptions(accuracy_level=0))
    assert summary.ops["com.microsoft::MatMulNBits"] == summary.quantized_modules_weights
    lm = OrtLM(summary.path)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    logits, state = lm.prefill(prompt)
    ref, ref_state = model.prefill(prompt)
    errors = [rel_err(logits, ref)]
    for _ in range(4):
        token = torch.randint(0, cfg.vocab_size, (2,), generator=g)
        errors.append(rel_err(lm.step(token, state), model.step(token, ref_state)))
    assert max(errors) <= 1e-4, errors
