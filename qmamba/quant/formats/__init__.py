"""Weight formats: a small registry of serializable format configs, one dataclass per format in its own file
(``int8.py``, ``int4.py``, ``binary.py``; the common base and the registry in ``base.py``), each knowing its
packing, its kernel weight record and its ONNX form. ``from qmamba.quant.formats import ...`` gives them all.

A format turns a dense weight ``W [..., N, K]`` (``nn.Linear`` orientation; stacked experts add leading dims) into
the packed tensors of :mod:`qmamba.quant.layout` and back. Algorithms (RTN, GPTQ, AWQ in ``qmamba.calib``) work on
a *grouped* view that is the same for every format:

    scale, zero = fmt.params(W, clip)        # [..., N, n_groups] each (zero is None for symmetric int8)
    q = fmt.quantize(W, scale, zero)         # integer codes [..., N, K]
    W_hat = fmt.dequantize_codes(q, scale, zero)
    packed = fmt.from_codes(q, scale, zero)  # layout tensors (qweight / scales / zeros)
    W_hat == fmt.dequantize(packed, K)       # exactly

Scales are rounded to fp16 *before* the codes are computed, so ``dequantize_codes`` equals the dequantized packed
tensors bit for bit. Formats registered: ``int8`` (per-output-channel symmetric, one group = the whole row),
``int4`` (group-wise along K, asymmetric with zero points by default, symmetric = zero point 8) and ``binary``
(1 bit, Bi-Mamba form; its params are per input column, see :class:`BinaryFormat`).

Beside the packing, each format gives

    fmt.kernel_weight(packed, n, k)          # the record the Triton matmuls read (qmamba.kernels.weights),
                                             # carrying the int4 group size
    fmt.matmul_nbits(packed, n, k)           # its ONNX Runtime MatMulNBits form (MatMulNBitsForm), for the export

so no caller asks a format its name. :func:`make_format` (the CLI's ``--bits``) and :func:`format_from_dict` (a
manifest entry) find formats through the registry. The modules that hold packed weights are in
:mod:`qmamba.quant.modules`; this package imports nothing above the layouts (and the PTB statistics of
:mod:`qmamba.quant.binarize`; the kernel records, lazily).
"""

from __future__ import annotations

import dataclasses

from qmamba.errors import ConfigError
from qmamba.quant.formats.base import FORMATS, MatMulNBitsForm, WeightFormat, matmul_nbits_block, register_format
# registered in this order (the order of FORMATS): int8, int4, binary
from qmamba.quant.formats.int8 import Int8Format  # isort: skip
from qmamba.quant.formats.int4 import Int4Format  # isort: skip
from qmamba.quant.formats.binary import (BinaryFormat, binary_apply, binary_as_matmul_nbits,  # isort: skip
                                         binary_operands, is_binary)

__all__ = ["FORMATS", "SUPPORTED_BITS", "WeightFormat", "Int8Format", "Int4Format", "BinaryFormat",
           "MatMulNBitsForm", "register_format", "format_from_dict", "make_format", "matmul_nbits_block",
           "binary_apply", "binary_operands", "binary_as_matmul_nbits", "is_binary"]

SUPPORTED_BITS = {cls.bits: name for name, cls in FORMATS.items()}  # --bits: {8: "int8", 4: "int4", 1: "binary"}


def format_from_dict(data: dict) -> WeightFormat:
    """Inverse of ``fmt.to_dict()``; unknown formats or keys give a clear :class:`ConfigError`."""
    if not isinstance(data, dict) or "format" not in data:
        raise ConfigError(f"a quantization format entry must be a dict with a 'format' key, got {data!r}")
    name = data["format"]
    if not isinstance(name, str) or name not in FORMATS:
        raise ConfigError(f"unknown weight format {name!r}; known: {', '.join(sorted(FORMATS))}")
    cls = FORMATS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    rest = {k: v for k, v in data.items() if k not in ("format", "bits")}
    unknown = sorted(set(rest) - fields)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} for weight format {name!r} (allowed: {sorted(fields)})")
    if "bits" in data and data["bits"] != cls.bits:
        raise ConfigError(f"format {name!r} has {cls.bits} bits, entry says {data['bits']}")
    for f in dataclasses.fields(cls):  # booleans (symmetric, row_scale) must be booleans, not "yes" or 1
        if f.name in rest and isinstance(f.default, bool) and not isinstance(rest[f.name], bool):
            raise ConfigError(f"weight format {name!r}: {f.name} must be true or false, got {rest[f.name]!r}")
    return cls(**rest)


def make_format(bits: int, group_size: int = 128, symmetric: bool = False) -> WeightFormat:
    """The format for ``--bits``/``--group-size``/``--symmetric`` (each format takes the options that apply to it,
    :meth:`WeightFormat.from_options`); unsupported bit widths are a ConfigError."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"unsupported bit width {bits}: choose one of {sorted(SUPPORTED_BITS)} "
                          "(1 = binary)")
    return FORMATS[SUPPORTED_BITS[bits]].from_options(group_size=group_size, symmetric=symmetric)
