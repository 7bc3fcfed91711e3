"""The 1-bit ``binary`` weight format (Bi-Mamba form) in one place for its readers: the format, its modules and
its ONNX form.

``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` with ``s = +/-1`` bit-packed 8 per byte and ``alpha``/``beta`` fp16
per input column (layout: the "binary" section of :mod:`qmamba.quant.layout`); optional per-output-row variant
``row_scale`` (``W_hat[n, k] = r[n] * (...)``). The matmul never builds ``W_hat``::

    x @ W_hat^T = (x * alpha) @ S^T + (x . beta)          (then * r per output, in the row-scale variant)

Where each part is defined (this module names them all, so ``from qmamba.quant.binary import ...`` works):

* :class:`BinaryFormat` (``{"format": "binary", "bits": 1, "row_scale": false}`` in a manifest) is defined in
  :mod:`qmamba.quant.formats.binary` and registered with the other formats; it speaks the same grouped-params
  protocol as int4/int8, so the calibration walk handles it like any format (method ``"ptb"``: post-training
  binarization from column statistics, :mod:`qmamba.quant.binarize`).
* :class:`BinaryLinear` / :class:`BinaryExperts` (the int4 twins' subclasses; reference matmul = the format's
  :meth:`BinaryFormat.reference_matmul`, the factored form above, :func:`binary_matmul`, its operands optionally
  kept by the modules' dense cache) are in :mod:`qmamba.quant.modules`, beside the module swap that builds them. The
  ``"triton"`` backend hands the format's kernel record (:class:`qmamba.kernels.weights.BinaryWeight`) to
  ``triton_ops.linear``, which runs the 1-bit kernels of :mod:`qmamba.kernels.binary_matmul`.
* :func:`binary_as_matmul_nbits`, the exact 2-bit ``MatMulNBits`` form the ONNX export uses
  (:meth:`BinaryFormat.matmul_nbits`), and :meth:`BinaryFormat.kernel_weight`, the record the 1-bit kernels of
  :mod:`qmamba.kernels.binary_matmul` read, are defined with the format in :mod:`qmamba.quant.formats.binary`.
"""

from __future__ import annotations

from qmamba.quant.formats import BinaryFormat, binary_apply, binary_as_matmul_nbits, binary_operands, is_binary
from qmamba.quant.modules import BinaryExperts, BinaryLinear, binary_matmul

__all__ = ["BinaryFormat", "BinaryLinear", "BinaryExperts", "binary_matmul", "binary_apply", "binary_operands",
           "binary_as_matmul_nbits", "is_binary"]
