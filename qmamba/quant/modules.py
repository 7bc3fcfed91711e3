"""Quantized twins of ``nn.Linear`` and :class:`qmamba.moe.StackedExperts`, and the module swap used at load time.

Both hold the packed tensors of :mod:`qmamba.quant.layout` as buffers (``qweight``, ``scales``, ``zeros``), so a
quantized state dict has keys such as ``layers.0.mixer.in_proj.qweight`` or ``layers.1.mixer.experts.fc1.scales``.
The ``"reference"`` backend runs the format's reference matmul (int4/int8: dequantize to the activation dtype and
multiply; binary: the factored form, :func:`binary_matmul`): it is the oracle of the Triton kernels, which hook in
through the single methods :meth:`QuantLinear._matmul` and :meth:`QuantExperts._expert_matmul` when
``backend == "triton"``. The 1-bit twins :class:`BinaryLinear` / :class:`BinaryExperts` differ only in their
format. The reference operands are computed per call, or once with :func:`keep_dense_weights` (``load_model`` does
so on CPU: a quantized model then decodes as fast as the float one, holding a float copy of its quantized weights
besides the packed ones). With ``cpu_int4=True`` (``qmamba generate`` on CPU), int4 linears keep torch's packed
int4 layout instead and run its CPU int4 matmul (:func:`cpu_int4_matmul`; activations rounded to bfloat16).

The quantization manifest (``manifest["quantization"]`` of a checkpoint) maps module names to entries
``{"format": "int4", "group_size": 128, "symmetric": false, "method": "gptq", ...}``; :func:`swap_quantized_modules`
replaces the named modules by empty quantized twins of the right shapes before ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qmamba.errors import CheckpointError, ConfigError
from qmamba.moe import StackedExperts, expert_mlp, in_decode_step
from qmamba.quant import layout
from qmamba.quant.formats import (BinaryFormat, Int4Format, WeightFormat, binary_apply, binary_operands,
                                  format_from_dict, is_binary)

# keys of a manifest module entry that describe how it was made, not the format
ENTRY_INFO_KEYS = ("method", "fallback", "n_tokens", "note")


def _register_packed(module: nn.Module, fmt: WeightFormat, n: int, k: int, lead: tuple = (), device=None):
    for name, (shape, dtype) in fmt.buffer_specs(n, k, lead).items():
        module.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))


def _packed(module: nn.Module, fmt: WeightFormat) -> dict:
    """The module's packed tensors in the stored layout (int4 held as plane words is converted back: a copy)."""
    packed = {name: getattr(module, name) for name in fmt.buffer_specs(1, 1)}
    if module._plane_words:
        packed["qweight"] = layout.int4_from_planes(packed["qweight"], packed["scales"].shape[-1], fmt.group_size)
    return packed


def plane_words_apply(fmt: WeightFormat) -> bool:
    """Whether weights of ``fmt`` have a plane-word form (:func:`qmamba.quant.layout.int4_to_planes`) that the
    CUDA kernels read: int4 with a group size that is a multiple of the 128-element plane tile."""
    return isinstance(fmt, Int4Format) and fmt.group_size % layout.INT4_TILE == 0


class _KeepsPackedDtypes(nn.Module):
    """``model.to(dtype)`` / ``.half()`` move packed buffers between devices but never change their dtypes (a
    bf16 cast would corrupt the fp16 scales); float parameters (bias) convert as usual.

    Also the optional dense cache of the reference path: :meth:`keep_dense` computes the reference matmul's
    operands (``W_hat``, or the binary format's +/-1 matrix and column scales) once, in one dtype, instead of on
    every call. It is keyed by the packed buffers (device, storage, version) and the dtype, so changed or moved
    weights are never served stale; it is not part of the state dict."""

    fmt: WeightFormat
    _dense_cache = None  # {"key", "names", "operands", "per_matrix"} (see keep_dense) or None
    _plane_words = False  # qweight holds int4 plane words (use_plane_words) instead of the stored bytes

    def use_plane_words(self) -> int:
        """Hold the int4 codes as plane words (:func:`qmamba.quant.layout.int4_to_planes`), the layout the CUDA
        matmul kernels read without rearranging, *in place of* the stored bytes (same size); returns the bytes
        converted (0 where :func:`plane_words_apply` says no, or already done). Everything that reads the packed
        tensors (the reference path, :meth:`packed`, the state dict) still sees the stored layout, converted back on
        the fly; the kernels get the plane form from :meth:`kernel_weight`."""
        if self._plane_words or not plane_words_apply(self.fmt):
            return 0
        q = self._buffers["qweight"]
        self._buffers["qweight"] = layout.int4_to_planes(q, self._k)
        self._plane_words = True
        self._dense_cache = None
        return q.numel() * q.element_size()

    def _kernel_weight(self, n: int, k: int, expert: int | None = None):
        """The kernel record of the packed tensors (of matrix ``expert`` of a stack), in the layout held."""
        if self._plane_words:
            planes = {name: t if expert is None else t[expert] for name, t in self._buffers.items()}
            return self.fmt.plane_kernel_weight(planes, n, k)
        return self.fmt.kernel_weight(self.packed() if expert is None else self.packed(expert), n, k)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._plane_words:  # checkpoints hold the stored layout
            destination[prefix + "qweight"] = _packed(self, self.fmt)["qweight"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        if self._plane_words and key in state_dict:  # a stored-layout tensor into the plane form
            q = state_dict[key]
            expected = self.fmt.buffer_specs(1, self._k)["qweight"][0][-2:]
            if tuple(q.shape[-2:]) == tuple(expected):
                state_dict = {**state_dict, key: layout.int4_to_planes(q, self._k)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        packed = {name: buf for name, buf in self._buffers.items() if name in self.fmt.buffer_specs(1, 1)}
        super()._apply(fn, recurse)
        for name, old in packed.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._dense_cache = None
        return self

    def _dense_key(self, dtype, names: tuple) -> tuple:
        buffers = self._buffers
        return (dtype,) + tuple((buffers[n].device, buffers[n].data_ptr(), buffers[n]._version) for n in names)

    def _cached_operands(self, dtype, index=None) -> dict | None:
        """The kept operands in ``dtype`` (of matrix ``index`` of a stack), or ``None`` when there are none or
        the packed buffers changed since."""
        cache = self._dense_cache
        if cache is None or cache["key"] != self._dense_key(dtype, cache["names"]):
            return None
        return cache["operands"] if index is None else cache["per_matrix"][index]

    def keep_dense(self, dtype) -> int:
        """Compute the reference operands once in ``dtype`` and keep them; returns the bytes they take."""
        packed = _packed(self, self.fmt)
        ops = self.fmt.reference_operands(packed, self._k, dtype)
        n_matrices = getattr(self, "n_experts", None)  # a stack: per-matrix views, made once
        per_matrix = [{name: t[i] for name, t in ops.items()} for i in range(n_matrices)] if n_matrices else None
        names = tuple(packed)
        self._dense_cache = {"key": self._dense_key(dtype, names), "names": names, "operands": ops,
                             "per_matrix": per_matrix}
        return sum(t.numel() * t.element_size() for t in ops.values())

    def drop_dense(self) -> None:
        self._dense_cache = None


# ---- torch's packed int4 matmul on CPU (an opt-in alternative to the dense cache for int4 linears) --------------
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's CPU int4 matmul takes


def cpu_int4_available() -> bool:
    """Whether this torch has the CPU int4 matmul (``aten._weight_int4pack_mm_for_cpu``) and its weight packer."""
    return all(hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm_for_cpu",
                                                       "_convert_weight_to_int4pack_for_cpu"))


def cpu_int4_operands(fmt: WeightFormat, packed: dict, n: int, k: int) -> dict | None:
    """qmamba's int4 tensors ``[n, k]`` in the layout of torch's CPU int4 matmul, or ``None`` where it does not
    apply (another format or group size, ``k`` not a whole number of groups, not on CPU, an older torch).

    qmamba dequantizes ``(q - z) * s`` per group, torch ``(q - 8) * s + b``: the same weights with ``b = (8 - z) * s``
    (``s`` and ``b`` in bfloat16, the kernel's operand dtype). Rows are padded to a multiple of 16, as the packer
    requires."""
    if (not isinstance(fmt, Int4Format) or fmt.group_size not in CPU_INT4_GROUP_SIZES or k % fmt.group_size
            or packed["qweight"].device.type != "cpu" or not cpu_int4_available()):
        return None
    q, scales, zeros = fmt.unpack(packed, k)  # codes [n, k], scales and zero points [n, k / group_size]
    pad = -n % 16
    q = F.pad(q.to(torch.int32), (0, 0, 0, pad))
    scales_zeros = torch.stack([scales, (8.0 - zeros) * scales], dim=-1)  # [n, groups, 2]
    scales_zeros = F.pad(scales_zeros, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous().to(torch.bfloat16)
    return {"int4_cpu": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), "scales_zeros": scales_zeros}


def cpu_int4_matmul(x: torch.Tensor, ops: dict, n: int, group_size: int) -> torch.Tensor:
    """``x @ W_hat^T`` by torch's CPU int4 matmul: ``x`` rounded to bfloat16, the result returned in ``x.dtype``.
    The kernel takes a contiguous input only (a column slice, as x_proj's in bfloat16, is copied)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, ops["int4_cpu"], group_size, ops["scales_zeros"])
    return y[:, :n].to(x.dtype).reshape(*lead, n)


class QuantLinear(_KeepsPackedDtypes):
    """``y = x @ W_hat^T (+ bias)``, ``W_hat`` stored packed: ``x [..., in_features]`` -> ``[..., out_features]``."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, bias: bool = False,
                 device=None, bias_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.backend = "reference"
        _register_packed(self, fmt, out_features, in_features, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: WeightFormat, packed: dict | None = None) -> "QuantLinear":
        """Quantize ``linear`` (RTN unless ``packed`` tensors are given)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, device=w.device,
                  bias_dtype=w.dtype)
        mod.load_packed(packed if packed is not None else fmt.quantize_rtn(w))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_packed(self, packed: dict) -> None:
        self.fmt.check(packed, self.out_features, self.in_features)
        for name, tensor in packed.items():
            getattr(self, name).copy_(tensor)

    def packed(self) -> dict:
        return _packed(self, self.fmt)

    def kernel_weight(self):
        """The record the Triton matmuls read (:meth:`WeightFormat.kernel_weight` of this module's tensors; the
        plane form after :meth:`use_plane_words`)."""
        return self._kernel_weight(self.out_features, self.in_features)

    @property
    def _k(self) -> int:
        return self.in_features

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``W_hat [out_features, in_features]``."""
        return self.fmt.dequantize(self.packed(), self.in_features, dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_hat^T`` without bias; the one place a kernel backend replaces."""
        if self.backend == "triton":
            from qmamba.kernels import triton_ops  # lazily: triton is optional on CPU

            return triton_ops.linear(x, self.kernel_weight())
        ops = self._cached_operands(x.dtype)
        if ops is None:
            ops = self.fmt.reference_operands(self.packed(), self.in_features, x.dtype)
        elif "int4_cpu" in ops:
            return cpu_int4_matmul(x, ops, self.out_features, self.fmt.group_size)
        return self.fmt.reference_matmul(x, ops)

    def keep_cpu_int4(self, dtype) -> int:
        """Keep this int4 weight in torch's CPU int4 layout (:func:`cpu_int4_operands`) for activations in
        ``dtype``, in place of the dense cache: about 0.56 bytes per weight instead of 4, and a matmul that reads
        int4, but activations rounded to bfloat16 (not bit-exact with the reference). Returns the bytes kept, or 0
        (nothing kept) where it does not apply."""
        packed = self.packed()
        ops = cpu_int4_operands(self.fmt, packed, self.out_features, self.in_features)
        if ops is None:
            return 0
        names = tuple(packed)
        self._dense_cache = {"key": self._dense_key(dtype, names), "names": names, "operands": ops,
                             "per_matrix": None}
        return sum(t.numel() * t.element_size() for t in ops.values())

    def forward(self, x):
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.describe()}"


class PackedExpertWeight(_KeepsPackedDtypes):
    """One stacked expert matrix ``[E, N, K]`` stored packed (buffers ``qweight``/``scales``/``zeros``)."""

    def __init__(self, n_experts: int, n: int, k: int, fmt: WeightFormat, device=None):
        super().__init__()
        self.n_experts, self.n, self.k, self.fmt = n_experts, n, k, fmt
        _register_packed(self, fmt, n, k, (n_experts,), device=device)

    def load_packed(self, packed: dict) -> None:
        self.fmt.check(packed, self.n, self.k, (self.n_experts,))
        for name, tensor in packed.items():
            getattr(self, name).copy_(tensor)

    def packed(self, expert: int | None = None) -> dict:
        p = _packed(self, self.fmt)
        return p if expert is None else {name: t[expert] for name, t in p.items()}

    def kernel_weight(self, expert: int | None = None):
        """The record the Triton matmuls read (:meth:`WeightFormat.kernel_weight`; the plane form after
        :meth:`use_plane_words`): of the whole stack, or of one expert's matrix (a stack of one)."""
        return self._kernel_weight(self.n, self.k, expert)

    @property
    def _k(self) -> int:
        return self.k

    def dequantized(self, expert: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """``[N, K]`` for one expert or ``[E, N, K]`` for all."""
        return self.fmt.dequantize(self.packed(expert), self.k, dtype)

    def reference_matmul(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``x [T, K] @ W_hat[expert]^T`` by the format's reference matmul (dense cache when kept)."""
        ops = self._cached_operands(x.dtype, expert)
        if ops is None:
            ops = self.fmt.reference_operands(self.packed(expert), self.k, x.dtype)
        return self.fmt.reference_matmul(x, ops)

    def extra_repr(self):
        return f"experts={self.n_experts}, n={self.n}, k={self.k}, format={self.fmt.describe()}"


class QuantExperts(nn.Module):
    """Quantized :class:`StackedExperts`: ``forward(x [T, d], expert_idx [T]) -> [T, d]`` (unscaled).

    ``fc1`` / ``fc2`` are each a :class:`PackedExpertWeight` (formats may differ) or, when a recipe keeps one of
    them in float, the original ``nn.Parameter`` ``[E, N, K]``.
    """

    def __init__(self, n_experts: int, d_model: int, ffn_hidden: int, gated: bool, activation: str,
                 fc1_fmt: WeightFormat | None, fc2_fmt: WeightFormat | None, device=None, float_dtype=torch.float32):
        super().__init__()
        rows = 2 * ffn_hidden if gated else ffn_hidden
        self.n_experts, self.gated, self.activation = n_experts, gated, activation
        self.backend = "reference"
        self.int8_inputs = False  # the reference path rounds the W4A8-able matrices' inputs to int8 (see forward)
        self.int8_step_fc1 = False  # ... and a gated fc1's input in a batched step (see forward)
        self.int8_step_fc1_inputs: list | None = None  # a check's: those inputs as the fused step rounded them
        self.int8_step_fc2 = False  # ... and fc2's input in a batched step, where fc1's is (see forward)
        self.int8_step_fc2_inputs: list | None = None  # a check's: those inputs as the fused step rounded them
        for name, fmt, n, k in (("fc1", fc1_fmt, rows, d_model), ("fc2", fc2_fmt, d_model, ffn_hidden)):
            if fmt is None:
                setattr(self, name, nn.Parameter(torch.zeros(n_experts, n, k, dtype=float_dtype, device=device)))
            else:
                setattr(self, name, PackedExpertWeight(n_experts, n, k, fmt, device=device))

    @classmethod
    def from_stacked(cls, experts: StackedExperts, fc1_fmt, fc2_fmt, fc1_packed=None, fc2_packed=None):
        """Quantize ``experts`` (RTN unless packed tensors are given); ``None`` format keeps that matrix in float."""
        n_experts, rows, d = experts.fc1.shape
        mod = cls(n_experts, d, experts.fc2.shape[2], experts.gated, experts.activation, fc1_fmt, fc2_fmt,
                  device=experts.fc1.device, float_dtype=experts.fc1.dtype)
        for name, fmt, packed in (("fc1", fc1_fmt, fc1_packed), ("fc2", fc2_fmt, fc2_packed)):
            src = getattr(experts, name).detach()
            if fmt is None:
                getattr(mod, name).data.copy_(src)
            else:
                getattr(mod, name).load_packed(packed if packed is not None else fmt.quantize_rtn(src))
        return mod

    def expert_weight(self, name: str, expert: int, dtype=torch.float32) -> torch.Tensor:
        w = getattr(self, name)
        return w[expert].to(dtype) if isinstance(w, nn.Parameter) else w.dequantized(expert, dtype)

    def _expert_matmul(self, x: torch.Tensor, name: str, expert: int, int8_inputs: bool = False) -> torch.Tensor:
        """``x [T, K] @ W_hat[expert]^T`` for ``name`` in ("fc1", "fc2"); the one place a kernel backend replaces.
        ``int8_inputs`` (reference path): a matrix the W4A8 prefill can run (int4 plane words) multiplies its input
        rounded to int8 per row, as that kernel does (:func:`qmamba.kernels.w4a8_gemm.int8_rounded_ref`)."""
        w = getattr(self, name)
        if not isinstance(w, PackedExpertWeight):
            return F.linear(x, w[expert].to(x.dtype))
        if self.backend == "triton":
            from qmamba.kernels import triton_ops  # lazily: triton is optional on CPU

            return triton_ops.linear(x, w.kernel_weight(expert))
        if int8_inputs and plane_words_apply(w.fmt):
            from qmamba.kernels.w4a8_gemm import int8_rounded_ref

            x = int8_rounded_ref(x)
        return w.reference_matmul(x, expert)

    def w4a8_applies(self) -> bool:
        """Whether the W4A8 prefill would run one of these matrices (int4 plane words)."""
        return any(isinstance(w, PackedExpertWeight) and plane_words_apply(w.fmt)
                   for w in (self.fc1, self.fc2))

    @property
    def fc2_k(self) -> int:
        """fc2's input width (the experts' hidden size)."""
        return self.fc2.shape[2] if isinstance(self.fc2, nn.Parameter) else self.fc2.k

    def _given_inputs(self, name: str, shape) -> torch.Tensor | None:
        """The next recorded input of ``name`` (``int8_step_<name>_inputs``, one a step), or None where none is
        recorded."""
        given = getattr(self, f"int8_step_{name}_inputs")
        if not given:
            return None
        value = given.pop(0)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"int8_step_{name}_inputs: a step's {name} input is {tuple(value.shape)}, expected "
                             f"{tuple(shape)}")
        return value

    def forward(self, x, expert_idx):
        """``x [T, d]`` routed by ``expert_idx [T]``. The reference path can be the twin of the int8-activation
        kernels (``qmamba quantize``'s check of them, ``qmamba bench``'s reference): with ``int8_inputs`` the int4
        plane-word matrices multiply their inputs rounded to int8 per row from as many rows as the W4A8 prefill
        takes (:data:`qmamba.kernels.matmul_configs.W4A8_PREFILL_MIN_M`); with ``int8_step_fc1`` a gated fc1 does in
        a batched step (:func:`qmamba.moe.decode_step`, 2 to :data:`qmamba.kernels.decode_linear.MAX_ROWS` rows), as
        the fused step's W4A8 row programs do (``DecodePolicy.int8_rows``), and with ``int8_step_fc2`` as well its fc2
        (``DecodePolicy.int8_rows_fc2``). ``int8_step_fc1_inputs`` / ``int8_step_fc2_inputs``: lists of such steps'
        inputs ``[T, K]`` as the fused step rounded them (its ``int8_inputs_log``), taken one a step in place of
        rounding here: a check of the step's arithmetic that a value at a code's .5 boundary, rounded the other way
        in one path, cannot fail."""
        out = x.new_zeros(x.shape[0], self.fc2.shape[1] if isinstance(self.fc2, nn.Parameter) else self.fc2.n)
        round_fc1 = round_fc2 = False
        if self.int8_inputs and self.backend != "triton":
            from qmamba.kernels.matmul_configs import W4A8_PREFILL_MIN_M

            round_fc1 = round_fc2 = x.shape[0] >= W4A8_PREFILL_MIN_M
        step_rows = False
        if self.int8_step_fc1 and self.backend != "triton" and in_decode_step() and self.gated:
            from qmamba.kernels.decode_policy import MAX_ROWS

            step_rows = 2 <= x.shape[0] <= MAX_ROWS
        round_fc1 = round_fc1 or step_rows
        round_fc2 = round_fc2 or (step_rows and self.int8_step_fc2)
        given1 = self._given_inputs("fc1", x.shape) if step_rows else None
        given2 = self._given_inputs("fc2", (x.shape[0], self.fc2_k)) if step_rows and self.int8_step_fc2 else None
        for e in range(self.n_experts):
            rows = (expert_idx == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[rows] = expert_mlp(
                    x[rows], None, None, self.activation, self.gated,
                    fc1_fn=lambda t, e=e, rows=rows: (self._expert_matmul(t, "fc1", e, round_fc1) if given1 is None
                                                      else self._expert_matmul(given1[rows].to(x.dtype), "fc1", e)),
                    fc2_fn=lambda t, e=e, rows=rows: (self._expert_matmul(t, "fc2", e, round_fc2) if given2 is None
                                                      else self._expert_matmul(given2[rows].to(t.dtype), "fc2", e)))
        return out


# ---- the 1-bit twins (format ``binary``): same constructors, reference matmul in the factored form ----
def binary_matmul(x: torch.Tensor, packed: dict, k: int) -> torch.Tensor:
    """Reference factored matmul: ``x [..., K]`` -> ``(x * alpha) @ S^T + (x . beta)`` (``* r``) ``[..., N]``.

    Computed in ``x.dtype`` (the +/-1 matrix is exact in any float type)."""
    return binary_apply(x, binary_operands(packed, k, x.dtype))


class BinaryLinear(QuantLinear):
    """:class:`QuantLinear` in the binary format: ``x [..., in] -> [..., out]``; reference = factored matmul
    (the format's :meth:`BinaryFormat.reference_matmul`, its operands optionally in the dense cache)."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat | None = None, bias: bool = False,
                 device=None, bias_dtype=torch.float32):
        fmt = fmt or BinaryFormat()
        if not is_binary(fmt):
            raise TypeError(f"BinaryLinear needs the binary format, got {fmt.describe()}")
        super().__init__(in_features, out_features, fmt, bias, device=device, bias_dtype=bias_dtype)


class BinaryExperts(QuantExperts):
    """:class:`QuantExperts` where fc1 and/or fc2 are binary (the other may be int4/int8/float); each packed
    matrix uses its own format's reference matmul."""


# ---- module swap ------------------------------------------------------------------------------------------
def manifest_modules(quantization: dict) -> dict:
    """The ``{module_name: entry}`` map of a quantization manifest (also accepts ``{"modules": {...}}``)."""
    if quantization is None:
        return {}
    if not isinstance(quantization, dict):
        raise CheckpointError(f"manifest 'quantization' must be a dict, got {type(quantization).__name__}")
    if isinstance(quantization.get("modules"), dict):
        quantization = quantization["modules"]
    return quantization


def entry_format(name: str, entry: dict) -> WeightFormat:
    """Format of one manifest entry (info keys such as ``method`` are ignored)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"quantization entry for {name!r} must be a dict, got {entry!r}")
    try:
        return format_from_dict({k: v for k, v in entry.items() if k not in ENTRY_INFO_KEYS})
    except ConfigError as exc:
        raise CheckpointError(f"quantization entry for {name!r}: {exc}") from None


def swap_quantized_modules(model: nn.Module, quantization: dict, packed: dict[str, dict] | None = None, *,
                           rtn: bool = False) -> nn.Module:
    """Replace the named modules of ``model`` by their quantized twins, in place; returns ``model``.

    ``quantization``: ``{name: format}``, each format a :class:`WeightFormat` or a manifest entry (a checkpoint's
    ``manifest["quantization"]``, also as ``{"modules": {...}}``). Names: ``nn.Linear`` modules
    (``layers.0.mixer.in_proj``, ``lm_head``, ...) and the stacked expert matrices ``layers.1.mixer.experts.fc1`` /
    ``.fc2`` (an expert stack named for one matrix keeps the other in float). A twin holds ``packed[name]`` when
    given, else (``rtn=True``) the round-to-nearest packing of the float weight, else zeros of the right shapes for
    ``load_state_dict`` to fill, which also works on a model built on the ``meta`` device (buffers follow the
    device of the replaced module). A float bias is carried over; modules already quantized are left alone.
    """
    packed = packed or {}
    modules = dict(model.named_modules())
    expert_fmts: dict[str, dict] = {}
    for name, entry in manifest_modules(quantization).items():
        fmt = entry if isinstance(entry, WeightFormat) else entry_format(name, entry)
        parent_name, _, leaf = name.rpartition(".")
        if leaf in ("fc1", "fc2") and isinstance(modules.get(parent_name), (StackedExperts, QuantExperts)):
            expert_fmts.setdefault(parent_name, {})[leaf] = fmt
            continue
        target = modules.get(name)
        if isinstance(target, QuantLinear):
            continue  # already swapped
        if not isinstance(target, nn.Linear):
            raise CheckpointError(f"quantization manifest names {name!r}, which is not a linear layer or an expert "
                                  "matrix of this model")
        cls = linear_class_for(fmt)
        if name in packed or rtn:
            new = cls.from_linear(target, fmt, packed.get(name))
        else:
            w = target.weight
            new = cls(target.in_features, target.out_features, fmt, target.bias is not None, device=w.device,
                      bias_dtype=w.dtype)
        set_submodule(model, name, new)
    for name, fmts in expert_fmts.items():
        old = modules[name]
        if isinstance(old, QuantExperts):
            continue
        fc1_fmt, fc2_fmt = fmts.get("fc1"), fmts.get("fc2")
        parts = {leaf: packed.get(f"{name}.{leaf}") for leaf in fmts}
        cls = experts_class_for(fc1_fmt, fc2_fmt)
        if rtn or any(p is not None for p in parts.values()):
            if not rtn and any(p is None for p in parts.values()):
                raise ValueError(f"packed tensors for only one of the expert matrices of {name!r}")
            new = cls.from_stacked(old, fc1_fmt, fc2_fmt, parts.get("fc1"), parts.get("fc2"))
        else:
            n_experts, _, d = old.fc1.shape
            new = cls(n_experts, d, old.fc2.shape[2], old.gated, old.activation, fc1_fmt, fc2_fmt,
                      device=old.fc1.device, float_dtype=old.fc1.dtype)
        set_submodule(model, name, new)
    return model


def linear_class_for(fmt: WeightFormat) -> type:
    """The module class holding a linear in ``fmt``."""
    return BinaryLinear if is_binary(fmt) else QuantLinear


def experts_class_for(fc1_fmt: WeightFormat | None, fc2_fmt: WeightFormat | None) -> type:
    """The experts class for these fc1/fc2 formats (:class:`BinaryExperts` when either is binary)."""
    return BinaryExperts if any(f is not None and is_binary(f) for f in (fc1_fmt, fc2_fmt)) else QuantExperts


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name`` (``layers.0.mixer.in_proj``)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names (manifest convention) of the quantized weights in ``model``."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            names.append(name)
        elif isinstance(mod, QuantExperts):
            names += [f"{name}.{w}" for w in ("fc1", "fc2") if isinstance(getattr(mod, w), PackedExpertWeight)]
    return names


def keep_dense_weights(model: nn.Module, dtype, cpu_int4: bool = False) -> int:
    """Give every quantized module of ``model`` a dense cache in ``dtype`` (the reference path then runs at the
    float model's speed); returns the bytes added: about the float model's size for the quantized weights
    (4 bytes per weight in float32, 2 in bfloat16), on top of the packed tensors, which stay for saving and export.
    ``cpu_int4``: int4 linears that torch's CPU int4 matmul takes keep its layout instead
    (:meth:`QuantLinear.keep_cpu_int4`: faster and smaller, activations rounded to bfloat16).
    :func:`drop_dense_weights` gives the memory back."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, _KeepsPackedDtypes):
            kept = mod.keep_cpu_int4(dtype) if cpu_int4 and isinstance(mod, QuantLinear) else 0
            total += kept or mod.keep_dense(dtype)
    return total


def use_plane_words(model: nn.Module) -> int:
    """Convert every int4 weight of ``model`` that has a plane form (:func:`plane_words_apply`) to plane words in
    place (:meth:`_KeepsPackedDtypes.use_plane_words`: no second copy); returns the bytes converted. The CUDA
    kernels then read the layout made for them; everything else sees the stored layout as before."""
    return sum(mod.use_plane_words() for mod in model.modules() if isinstance(mod, _KeepsPackedDtypes))


def cpu_int4_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that run torch's CPU int4 matmul (:meth:`QuantLinear.keep_cpu_int4`)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, QuantLinear)
            and mod._dense_cache is not None and "int4_cpu" in mod._dense_cache["operands"]]


def drop_dense_weights(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, _KeepsPackedDtypes):
            mod.drop_dense()

