"""Weight formats: a small registry of serializable format configs, one dataclass per format, each knowing its
packing, its kernel weight record and its ONNX form.

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

so no caller asks a format its name. The modules that hold packed weights are in :mod:`qmamba.quant.modules`; this
file imports nothing above the layouts (and the PTB statistics of :mod:`qmamba.quant.binarize`; the kernel
records, lazily).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qmamba.errors import ConfigError
from qmamba.quant import layout
from qmamba.quant.binarize import ptb, reconstruct, signs_for

FORMATS: dict[str, type] = {}
_FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal: scales never round to 0


def register_format(name: str):
    """Class decorator: register a format config dataclass under ``name``."""

    def wrap(cls):
        cls.name = name
        FORMATS[name] = cls
        return cls

    return wrap


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales to fp16 values (kept as float32), never 0 nor inf."""
    return scale.clamp(min=_FP16_TINY, max=60000.0).to(torch.float16).float()


def _as_clip(clip, like: torch.Tensor) -> torch.Tensor:
    """Clip ratio (float or tensor broadcastable to ``like`` [..., N, G]) as a tensor."""
    return torch.as_tensor(clip, dtype=torch.float32, device=like.device).expand_as(like)


class WeightFormat:
    """Common behaviour; subclasses implement the grouped quantizer and the layout conversion."""

    name = "?"
    bits = 0

    # ---- grouping ------------------------------------------------------------------------------------
    def group_size_for(self, k: int) -> int:
        raise NotImplementedError

    def n_groups(self, k: int) -> int:
        return math.ceil(k / self.group_size_for(k))

    def _grouped(self, W: torch.Tensor):
        """``W [..., N, K]`` -> ``[..., N, G, g]`` zero-padded view (float32) and K."""
        k = W.shape[-1]
        g = self.group_size_for(k)
        n_groups = math.ceil(k / g)
        Wf = W.float()
        if n_groups * g != k:
            Wf = torch.nn.functional.pad(Wf, (0, n_groups * g - k))
        return Wf.reshape(*W.shape[:-1], n_groups, g), k

    def expand_groups(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Per-group tensor ``[..., N, G]`` -> per-element ``[..., N, K]``."""
        return t.repeat_interleave(self.group_size_for(k), dim=-1)[..., :k]

    # ---- the verbs -----------------------------------------------------------------------------------
    def quantize_rtn(self, W: torch.Tensor) -> dict:
        """Round-to-nearest: ``W [..., N, K]`` -> packed dict."""
        scale, zero = self.params(W)
        return self.from_codes(self.quantize(W, scale, zero), scale, zero)

    def fake_quantize(self, W: torch.Tensor, clip=1.0) -> torch.Tensor:
        """Quantize-dequantize round trip (float32) with optional clipping ratio."""
        scale, zero = self.params(W, clip)
        return self.dequantize_codes(self.quantize(W, scale, zero), scale, zero)

    # ---- the pure-PyTorch reference matmul -------------------------------------------------------------
    def reference_operands(self, packed: dict, k: int, dtype=torch.float32) -> dict:
        """What :meth:`reference_matmul` needs, in ``dtype``: by default the dense ``W_hat [..., N, K]``. Computed
        per call, or once and kept by a module's dense cache (see :mod:`qmamba.quant.modules`)."""
        return {"weight": self.dequantize(packed, k, dtype)}

    def reference_matmul(self, x: torch.Tensor, operands: dict) -> torch.Tensor:
        """``x [..., K] @ W_hat^T`` from :meth:`reference_operands` (of one matrix)."""
        return torch.nn.functional.linear(x, operands["weight"])

    # ---- kernel record and ONNX form -----------------------------------------------------------------
    def kernel_weight(self, packed: dict, n: int, k: int):
        """The record the Triton matmuls read for one matrix ``[N, ...]`` or a stack ``[E, N, ...]``."""
        raise NotImplementedError(f"the Triton backend has no kernel for weight format {self.name!r}")

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """One matrix as ONNX Runtime's ``MatMulNBits`` (see :class:`MatMulNBitsForm`)."""
        raise NotImplementedError(f"weight format {self.name!r} has no ONNX form")

    @property
    def has_onnx_form(self) -> bool:
        """Whether this registered format defines its own ``MatMulNBits`` form (a format registered by subclassing
        another does not inherit it: its tensors may mean something else)."""
        return "matmul_nbits" in type(self).__dict__

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        return self.name


@register_format("int8")
@dataclass(frozen=True)
class Int8Format(WeightFormat):
    """Per-output-channel symmetric int8: ``W[n, k] = q[n, k] * scales[n]``, q in [-127, 127]."""

    bits = 8
    QMAX = 127

    def group_size_for(self, k: int) -> int:
        return k

    def params(self, W, clip=1.0):
        Wg, _ = self._grouped(W)
        amax = Wg.abs().amax(dim=-1) * _as_clip(clip, Wg[..., 0])
        return _fp16_scale(amax / self.QMAX), None

    def quantize(self, W, scale, zero=None):
        q = torch.round(W.float() / self.expand_groups(scale, W.shape[-1]))
        return q.clamp(-self.QMAX, self.QMAX).to(torch.int8)

    def dequantize_codes(self, q, scale, zero=None):
        return q.float() * self.expand_groups(scale, q.shape[-1])

    def from_codes(self, q, scales, zeros=None) -> dict:
        if scales.shape[-1] != 1:
            raise layout.LayoutError(f"int8 has one scale per row; got scales of shape {tuple(scales.shape)}")
        return {"qweight": q.to(torch.int8).contiguous(),
                "scales": scales[..., 0].to(torch.float16).contiguous()}

    def dequantize(self, packed: dict, k: int, dtype=torch.float32) -> torch.Tensor:
        return layout.dequantize_int8(packed["qweight"], packed["scales"], dtype)

    def buffer_specs(self, n: int, k: int, lead: tuple = ()) -> dict:
        return {"qweight": ((*lead, n, k), torch.int8), "scales": ((*lead, n), torch.float16)}

    def check(self, packed: dict, n: int, k: int, lead: tuple = ()) -> None:
        layout.check_int8(packed["qweight"], packed["scales"], n, k, lead)

    def unpack(self, packed: dict, k: int):
        """Packed -> ``(q, scale [..., N, 1], None)``: the inverse of :meth:`from_codes`."""
        return packed["qweight"], packed["scales"].float()[..., None], None

    def kernel_weight(self, packed: dict, n: int, k: int):
        from qmamba.kernels.weights import PackedWeight

        return PackedWeight.from_int8(packed, n, k)

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """8-bit ``MatMulNBits`` with codes ``q + 128`` (default zero point 128), K padded to whole blocks with code
        128 (exactly 0) and the row scale repeated per block: exact."""
        block = matmul_nbits_block(k)
        n_blocks = -(-k // block)
        codes = packed["qweight"].to(torch.int16) + 128
        if n_blocks * block != k:
            codes = F.pad(codes, (0, n_blocks * block - k), value=128)
        return MatMulNBitsForm(8, block, {"qweight_u8": codes.to(torch.uint8).reshape(n, n_blocks, block),
                                          "scales": packed["scales"][:, None].expand(n, n_blocks)})

    def to_dict(self) -> dict:
        return {"format": "int8", "bits": 8}


@register_format("int4")
@dataclass(frozen=True)
class Int4Format(WeightFormat):
    """Group-wise int4 (ONNX Runtime MatMulNBits layout): ``W = (q - zero) * scale`` per group of K.

    Asymmetric (default): the group's range [min(w, 0), max(w, 0)] maps to codes 0..15 with an integer zero point.
    Symmetric: zero point 8, ``scale = max|w| / 7``, codes clamped to 0..15 (so -8 is reachable, +8 is not).
    K not a multiple of the group size is padded up to whole groups (padded codes = zero point, i.e. exactly 0).
    """

    group_size: int = 128
    symmetric: bool = False
    bits = 4

    def __post_init__(self):
        if type(self.group_size) is not int or self.group_size not in layout.INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size must be one of {layout.INT4_GROUP_SIZES}, got {self.group_size}")

    def group_size_for(self, k: int) -> int:
        return self.group_size

    def params(self, W, clip=1.0):
        Wg, k = self._grouped(W)
        if Wg.shape[-1] * Wg.shape[-2] != k:  # padded tail: its statistics come from the real columns only
            mask = torch.arange(Wg.shape[-2] * Wg.shape[-1], device=W.device).reshape(Wg.shape[-2:]) < k
            big = torch.finfo(torch.float32).max
            w_max = torch.where(mask, Wg, torch.full_like(Wg, -big)).amax(-1)
            w_min = torch.where(mask, Wg, torch.full_like(Wg, big)).amin(-1)
        else:
            w_max, w_min = Wg.amax(-1), Wg.amin(-1)
        ratio = _as_clip(clip, w_max)
        if self.symmetric:
            amax = torch.maximum(w_max.abs(), w_min.abs()) * ratio
            scale = _fp16_scale(amax / 7.0)
            return scale, torch.full_like(scale, 8.0)
        w_max = w_max.clamp(min=0) * ratio
        w_min = w_min.clamp(max=0) * ratio
        scale = _fp16_scale((w_max - w_min) / 15.0)
        zero = torch.round(-w_min / scale).clamp(0, 15)
        return scale, zero

    def quantize(self, W, scale, zero):
        k = W.shape[-1]
        q = torch.round(W.float() / self.expand_groups(scale, k)) + self.expand_groups(zero.float(), k)
        return q.clamp(0, 15).to(torch.uint8)

    def dequantize_codes(self, q, scale, zero):
        k = q.shape[-1]
        return (q.float() - self.expand_groups(zero.float(), k)) * self.expand_groups(scale, k)

    def from_codes(self, q, scales, zeros) -> dict:
        if zeros is None:
            zeros = torch.full_like(scales, 8.0)
        return layout.pack_int4(q, scales, zeros, self.group_size)

    def dequantize(self, packed: dict, k: int, dtype=torch.float32) -> torch.Tensor:
        return layout.dequantize_int4(packed["qweight"], packed["scales"], packed["zeros"], k, dtype)

    def buffer_specs(self, n: int, k: int, lead: tuple = ()) -> dict:
        nb = layout.int4_num_blocks(k, self.group_size)
        return {"qweight": ((*lead, n, nb, self.group_size // 2), torch.uint8),
                "scales": ((*lead, n, nb), torch.float16),
                "zeros": ((*lead, n, (nb + 1) // 2), torch.uint8)}

    def check(self, packed: dict, n: int, k: int, lead: tuple = ()) -> None:
        layout.check_int4(packed["qweight"], packed["scales"], packed["zeros"], n, k, self.group_size, lead)

    def unpack(self, packed: dict, k: int):
        q, z = layout.unpack_int4(packed["qweight"], packed["zeros"], k)
        return q, packed["scales"].float(), z.float()

    def kernel_weight(self, packed: dict, n: int, k: int):
        from qmamba.kernels.weights import PackedWeight

        return PackedWeight.from_int4(packed, n, k, self.group_size)

    def plane_kernel_weight(self, planes: dict, n: int, k: int):
        """The kernel record of the same weight held as plane words (``planes["qweight"]`` from
        :func:`qmamba.quant.layout.int4_to_planes`; scales and zero points as stored)."""
        from qmamba.kernels.weights import PackedWeight

        return PackedWeight.from_int4_planes(planes, n, k, self.group_size)

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """4-bit ``MatMulNBits``, block = the group: the packed tensors unchanged (the layout *is* MatMulNBits')."""
        return MatMulNBitsForm(4, self.group_size, {key: packed[key] for key in ("qweight", "scales", "zeros")})

    def describe(self) -> str:
        return f"int4-g{self.group_size}{'-sym' if self.symmetric else ''}"


@register_format("binary")
@dataclass(frozen=True)
class BinaryFormat(WeightFormat):
    """1 bit per weight: ``W_hat[n, k] = alpha[k] * s[n, k] + beta[k]`` (``row_scale``: times ``r[n]``), ``s = +/-1``
    bit-packed 8 per byte, ``alpha``/``beta`` fp16 per input column. Grouped protocol: ``params(W) -> (ab [..., 2,
    K] = stack(alpha, beta), r [..., N] or None)``, ``quantize(W, ab, r)`` -> sign bits ``[..., N, K]`` (1 = +1),
    ``dequantize_codes(bits, ab, r) == dequantize(from_codes(bits, ab, r))`` exactly."""

    row_scale: bool = False
    bits = 1
    data_free_method = "ptb"  # what the calibration walk records for its statistics-only initialisation

    # ---- grouped protocol (one "group" = the whole row; params are per column) ---------------------------------
    def group_size_for(self, k: int) -> int:
        return k

    def params(self, W, clip=1.0):
        """``W [..., N, K]`` -> ``(ab [..., 2, K], r [..., N] | None)`` by PTB (``clip`` is ignored)."""
        _, alpha, beta, r = ptb(W, row_scale=self.row_scale)
        return torch.stack([alpha, beta], dim=-2), r

    def quantize(self, W, scale, zero=None):
        return signs_for(W, scale[..., 1, :].float(), None if zero is None else zero.float())

    def dequantize_codes(self, q, scale, zero=None):
        r = None if zero is None else zero.float()
        return reconstruct(q, scale[..., 0, :].float(), scale[..., 1, :].float(), r)

    def from_codes(self, q, scales, zeros=None) -> dict:
        if self.row_scale and zeros is None:
            raise layout.LayoutError("binary row_scale variant needs the row scales")
        packed = {"qweight": layout.pack_signs(q),
                  "alpha": scales[..., 0, :].to(torch.float16).contiguous(),
                  "beta": scales[..., 1, :].to(torch.float16).contiguous()}
        if self.row_scale:
            packed["row_scale"] = zeros.to(torch.float16).contiguous()
        return packed

    def unpack(self, packed: dict, k: int):
        """Packed -> ``(bits, ab, r)``: the inverse of :meth:`from_codes`."""
        ab = torch.stack([packed["alpha"].float(), packed["beta"].float()], dim=-2)
        r = packed["row_scale"].float() if self.row_scale else None
        return layout.unpack_signs(packed["qweight"], k), ab, r

    # ---- layout ------------------------------------------------------------------------------------------------
    def dequantize(self, packed: dict, k: int, dtype=torch.float32) -> torch.Tensor:
        return layout.dequantize_binary(packed["qweight"], packed["alpha"], packed["beta"], k,
                                        packed.get("row_scale") if self.row_scale else None, dtype)

    def buffer_specs(self, n: int, k: int, lead: tuple = ()) -> dict:
        specs = {"qweight": ((*lead, n, layout.binary_num_bytes(k)), torch.uint8),
                 "alpha": ((*lead, k), torch.float16), "beta": ((*lead, k), torch.float16)}
        if self.row_scale:
            specs["row_scale"] = ((*lead, n), torch.float16)
        return specs

    def check(self, packed: dict, n: int, k: int, lead: tuple = ()) -> None:
        layout.check_binary(packed.get("qweight"), packed.get("alpha"), packed.get("beta"), n, k,
                            packed.get("row_scale"), lead, self.row_scale)

    def to_dict(self) -> dict:
        return {"format": "binary", "bits": 1, "row_scale": self.row_scale}

    def kernel_weight(self, packed: dict, n: int, k: int):
        from qmamba.kernels.weights import BinaryWeight

        return BinaryWeight.from_packed(packed, n, k)

    def matmul_nbits(self, packed: dict, n: int, k: int) -> "MatMulNBitsForm":
        """``MatMulNBits(bits=2)(x * alpha)`` (+/-1 exact, the row scale as the block scales) ``+ (x @ beta)``
        (``* row_scale``); see :func:`binary_as_matmul_nbits`."""
        block = matmul_nbits_block(k)
        codes, scales = binary_as_matmul_nbits(packed, k, block)
        return MatMulNBitsForm(2, block, {"qweight_u2": codes, "scales_b": scales}, input_scale=packed["alpha"],
                               column_term=packed["beta"], row_scale=packed.get("row_scale"))

    def describe(self) -> str:
        return "binary-rowscale" if self.row_scale else "binary"

    # ---- reference matmul: factored, W_hat is never built --------------------------------------------------
    def reference_operands(self, packed: dict, k: int, dtype=torch.float32) -> dict:
        return binary_operands(packed, k, dtype)

    def reference_matmul(self, x: torch.Tensor, operands: dict) -> torch.Tensor:
        return binary_apply(x, operands)


def binary_operands(packed: dict, k: int, dtype=torch.float32) -> dict:
    """The factored matmul's operands in ``dtype``: ``S`` (+/-1, exact in any float type), ``alpha``, ``beta`` and
    ``row_scale`` (variant only); leading expert dims are kept."""
    ops = {"S": layout.signs_pm1(packed["qweight"], k, dtype), "alpha": packed["alpha"].to(dtype),
           "beta": packed["beta"].to(dtype)}
    if "row_scale" in packed:
        ops["row_scale"] = packed["row_scale"].to(dtype)
    return ops


def binary_apply(x: torch.Tensor, ops: dict) -> torch.Tensor:
    """``(x * alpha) @ S^T + (x . beta)`` (``* r``) from :func:`binary_operands` of one matrix."""
    y = torch.nn.functional.linear(x * ops["alpha"], ops["S"]) + (x @ ops["beta"])[..., None]
    if "row_scale" in ops:
        y = y * ops["row_scale"]
    return y


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


# ---- the ONNX form -------------------------------------------------------------------------------------------------
@dataclass
class MatMulNBitsForm:
    """One packed matrix as ONNX Runtime's ``com.microsoft.MatMulNBits``: ``bits``, ``block_size`` and its weight
    inputs after the activation, in order, by initializer suffix (``qweight*``, ``scales*`` and, for int4,
    ``zeros``; float tensors are cast to the activation dtype by the export). The 1-bit form is factored: the
    activation is multiplied by ``input_scale`` (alpha) first, and ``x @ column_term`` (beta; ``* row_scale``) is
    added to the product."""

    bits: int
    block_size: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    input_scale: torch.Tensor | None = None
    column_term: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None


def matmul_nbits_block(k: int) -> int:
    """``MatMulNBits`` block size for a row-wise format (int8, binary): the largest of 128/64/32/16 dividing ``k``,
    else 16 with K padded by zero codes."""
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    return 16


def is_binary(fmt) -> bool:
    return isinstance(fmt, BinaryFormat)


SUPPORTED_BITS = {8: "int8", 4: "int4", 1: "binary"}


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
    """The format for ``--bits``/``--group-size``/``--symmetric``; unsupported bit widths are a ConfigError."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"unsupported bit width {bits}: choose one of {sorted(SUPPORTED_BITS)} "
                          "(1 = binary)")
    if bits == 1:
        return BinaryFormat()
    if bits == 8:
        return Int8Format()
    return Int4Format(group_size=int(group_size), symmetric=bool(symmetric))
