"""The 1-bit ``binary`` weight format (Bi-Mamba form) in one place for its readers: the format, its modules and
its ONNX form.

``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` with ``s = +/-1`` bit-packed 8 per byte and ``alpha``/``beta`` fp16
per input column (layout: the "binary" section of :mod:`qmamba.quant.layout`); optional per-output-row variant
``row_scale`` (``W_hat[n, k] = r[n] * (...)``). The matmul never builds ``W_hat``::

    x @ W_hat^T = (x * alpha) @ S^T + (x . beta)          (then * r per output, in the row-scale variant)

Where each part is defined (this module names them all, so ``from qmamba.quant.binary import ...`` works):

* :class:`BinaryFormat` (``{"format": "binary", "bits": 1, "row_scale": false}`` in a manifest) is registered with
  the other formats in :mod:`qmamba.quant.formats`; it speaks the same grouped-params protocol as int4/int8, so the
  calibration walk handles it like any format (method ``"ptb"``: post-training binarization from column
  statistics, :mod:`qmamba.quant.binarize`).
* :class:`BinaryLinear` / :class:`BinaryExperts` (the int4 twins' subclasses; reference matmul = the format's
  :meth:`BinaryFormat.reference_matmul`, the factored form above, :func:`binary_matmul`, its operands optionally
  kept by the modules' dense cache) are in :mod:`qmamba.quant.modules`, beside the module swap that builds them. The
  ``"triton"`` backend goes through ``triton_ops.quant_linear``, which sends the binary format to
  :mod:`qmamba.kernels.binary_matmul`.
* :func:`binary_as_matmul_nbits`, the exact 2-bit ``MatMulNBits`` form the ONNX export uses, is defined here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.quant import layout
from qmamba.quant.formats import BinaryFormat, binary_apply, binary_operands, is_binary
from qmamba.quant.modules import BinaryExperts, BinaryLinear, binary_matmul

__all__ = ["BinaryFormat", "BinaryLinear", "BinaryExperts", "binary_matmul", "binary_apply", "binary_operands",
           "binary_as_matmul_nbits", "is_binary"]


def binary_as_matmul_nbits(packed: dict, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The +/-1 part of one binary matrix as an exact 2-bit ``MatMulNBits`` weight (ONNX Runtime layout).

    Codes ``q = 1 + 2 * bit`` (1 -> -1, 3 -> +1 against the default zero point 2), four per byte along K, low bits
    first, K padded to whole blocks with code 2 (exactly 0); scales are ``row_scale[n]`` per block (1 without the
    variant). Returns ``(qweight [N, n_blocks, block_size // 4] uint8, scales [N, n_blocks] float32)``; the caller
    multiplies the activation by ``alpha`` first and adds ``(x . beta) (* row_scale)``.
    """
    bits = layout.unpack_signs(packed["qweight"], k)
    n = bits.shape[0]
    n_blocks = -(-k // block_size)
    codes = 1 + 2 * bits.to(torch.int32)
    if n_blocks * block_size != k:
        codes = F.pad(codes, (0, n_blocks * block_size - k), value=2)
    codes = codes.reshape(n, n_blocks * block_size // 4, 4)
    byte = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    row = packed["row_scale"].float() if "row_scale" in packed else torch.ones(n)
    return byte.to(torch.uint8).reshape(n, n_blocks, block_size // 4), row[:, None].expand(n, n_blocks).contiguous()

