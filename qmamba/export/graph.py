"""Build the ONNX graph of a BlackMamba / Mamba model directly from its checkpoint tensors.

Why a hand-built graph (``onnx.helper``) rather than ``torch.onnx``: the model is a short, fixed pipeline of ops that
ONNX Runtime already has fused (``MatMulNBits``, ``CausalConvWithState``, ``LinearAttention``), the packed weight
layouts of :mod:`qmamba.quant.layout` map onto ``MatMulNBits`` by a copy, the scan must be one custom-domain node
with a model-local function, and the sequence length must stay dynamic (tracing unrolls the time loop). Building
from the tensors keeps every one of those choices explicit and needs no PyTorch model at export time.

One graph serves both roles the runner needs (state inputs and outputs use the flat layout of
:mod:`qmamba.state`)::

    input_ids [batch, length] int64, conv_state [n_mamba, batch, d_inner, d_conv] (activation dtype),
    ssm_state [n_mamba, batch, d_inner, d_state] fp32
      -> logits [batch, length, vocab] (activation dtype), conv_state_out, ssm_state_out (same shapes as inputs)

* prefill: ``length = prompt length`` with zero states (or the state of an earlier chunk: chunked prefill);
* decode step: ``length = 1`` with the states of the previous call.

Per block of :func:`qmamba.block_plan.block_plan` (the blocks :class:`qmamba.model.MambaLM` walks): fp32 residual,
RMSNorm in fp32, the mixer in the activation dtype. Mamba mixer: in_proj -> causal conv + SiLU
(``com.microsoft.CausalConvWithState`` with ``channels_last=1``, or plain Concat + depthwise ``Conv`` for a
portable graph) -> x_proj -> dt_proj -> ``qmamba::SelectiveScan`` -> out_proj. Switch-MoE (top-1, sigmoid
router): the router picks ``argmax`` of ``sigmoid(logits)``; each expert runs exactly once on its own tokens
(``NonZero`` + ``Gather`` -> expert MLP), unrolled over the experts at export, and one ``ScatterND`` puts the
results back in token order, where one ``Mul`` applies every token's router weight. ``com.microsoft.QMoE`` is not used: its GELU is the
tanh approximation (BlackMamba uses the exact erf GELU) and it needs the hidden sizes divisible by the
quantization block.

Linear layers: float -> ``MatMul`` against the transposed weight; quantized -> the format's ``MatMulNBits`` form
(:meth:`qmamba.quant.formats.WeightFormat.matmul_nbits`, defined with each format): int4 -> ``MatMulNBits(bits=4)``
with the packed tensors copied unchanged (the layout *is* MatMulNBits'); int8 (per-output-channel symmetric) ->
``MatMulNBits(bits=8)`` with codes ``q + 128``, exact, and on CPU the fast int8 path at ``accuracy_level=4``;
binary -> ``MatMulNBits(bits=2)`` on ``x * alpha`` plus ``x @ beta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper

from qmamba.block_plan import BlockSpec, block_plan
from qmamba.config import ModelConfig
from qmamba.errors import ConfigError

from . import scan_op

DTYPES = {"fp32": (torch.float32, TensorProto.FLOAT), "fp16": (torch.float16, TensorProto.FLOAT16)}
CONV_IMPLS = ("auto", "causal-conv-with-state", "plain")
MIN_OPSET, MAX_OPSET = 20, 26  # Gelu needs 20; onnxruntime rejects ai.onnx 27 (see reference notes)
MS_DOMAIN = "com.microsoft"
INPUT_NAMES = ("input_ids", "conv_state", "ssm_state")
OUTPUT_NAMES = ("logits", "conv_state_out", "ssm_state_out")


@dataclass(frozen=True)
class ExportOptions:
    """How to export. ``scan``: SelectiveScan function body (see :data:`scan_op.SCAN_BODIES`). ``conv``:
    ``auto`` = CausalConvWithState with the linear-attention body, plain ops with the portable Scan body.
    ``accuracy_level``: MatMulNBits' attribute (4 = int8 activations: the fast CPU path; 0 = exact; what each
    costs: benchmarks/onnx_accuracy_level.md)."""

    scan: str = "linear-attention"
    opset: int = 21
    dtype: str = "fp32"
    conv: str = "auto"
    accuracy_level: int = 4

    def validate(self) -> None:
        if self.scan not in scan_op.SCAN_BODIES:
            raise ConfigError(f"unknown scan body {self.scan!r}; choose from {', '.join(scan_op.SCAN_BODIES)}")
        if not MIN_OPSET <= int(self.opset) <= MAX_OPSET:
            raise ConfigError(f"opset {self.opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} "
                              "(onnxruntime rejects ai.onnx opset 27)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported export dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.conv not in CONV_IMPLS:
            raise ConfigError(f"unknown conv implementation {self.conv!r}; choose from {', '.join(CONV_IMPLS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    @property
    def conv_impl(self) -> str:
        if self.conv != "auto":
            return self.conv
        return "causal-conv-with-state" if self.scan == "linear-attention" else "plain"


def check_exportable(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for configurations the graph builder does not cover."""
    if cfg.n_mamba_layers == 0:
        raise ConfigError("cannot export a model without Mamba layers: the graph's state inputs would be empty")
    if cfg.d_conv < 2:
        raise ConfigError(f"d_conv={cfg.d_conv} is not supported by the export (the causal conv needs width >= 2)")
    if cfg.expert_activation not in ("gelu", "gelu_tanh", "silu", "relu"):
        raise ConfigError(f"expert activation {cfg.expert_activation!r} has no ONNX mapping")


class GraphBuilder:
    """Accumulates nodes and initializers; one method per model part. Tensor names follow the checkpoint's."""

    def __init__(self, cfg: ModelConfig, state_dict: dict, quantization: dict | None, options: ExportOptions):
        options.validate()
        check_exportable(cfg)
        from qmamba.quant.modules import entry_format, manifest_modules

        self.cfg, self.sd, self.opt = cfg, state_dict, options
        self.formats = {name: entry_format(name, entry) for name, entry in manifest_modules(quantization).items()}
        for name, fmt in self.formats.items():
            if not fmt.has_onnx_form:
                raise ConfigError(f"module {name!r} uses weight format {fmt.name!r}, which the ONNX export does not "
                                  "support yet (the format defines no MatMulNBits form)")
            if name.startswith("embedding"):
                raise ConfigError("quantized embeddings are not supported by the ONNX export")
        self.torch_dtype, self.elem = DTYPES[options.dtype]
        self.nodes, self.initializers, self._names = [], [], set()
        self._counter = 0
        self.packed_weights = 0  # MatMulNBits weight tensors written
        self.ops_used: dict[str, int] = {}

    # ---- primitives ----------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}__{self._counter}"

    def const(self, name: str, value) -> str:
        """Add an initializer (numpy array or torch tensor) once; returns its name."""
        if name in self._names:
            return name
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous().numpy()
        self.initializers.append(numpy_helper.from_array(np.asarray(value, order="C"), name))
        self._names.add(name)
        return name

    def ints(self, values) -> str:
        values = [int(v) for v in values]
        return self.const("const_i64_" + "_".join(str(v).replace("-", "m") for v in values),
                          np.array(values, dtype=np.int64))

    def scalar_i64(self, value: int) -> str:
        return self.const(f"const_scalar_i64_{int(value)}".replace("-", "m"), np.array(int(value), dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
           **attrs):
        """Add a node; returns its output name (or list of names when ``n_out > 1``)."""
        outputs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain or None, **attrs))
        key = f"{domain}::{op_type}" if domain else op_type
        self.ops_used[key] = self.ops_used.get(key, 0) + 1
        return outputs[0] if n_out == 1 else outputs

    def to_float(self, x: str) -> str:
        return x if self.elem == TensorProto.FLOAT else self.op("Cast", [x], to=TensorProto.FLOAT)

    def to_act(self, x: str) -> str:
        return x if self.elem == TensorProto.FLOAT else self.op("Cast", [x], to=self.elem)

    def act_tensor(self, name: str) -> torch.Tensor:
        """A float checkpoint tensor in the activation dtype (as the PyTorch model would hold it)."""
        return self.sd[name].to(self.torch_dtype)

    def fp32_param(self, name: str) -> torch.Tensor:
        """A float parameter rounded through the activation dtype, then fp32 (what the model computes with)."""
        return self.sd[name].to(self.torch_dtype).float()

    # ---- linear layers -------------------------------------------------------------------------------
    def _matmul_nbits(self, x: str, name: str, packed: dict, fmt, n: int, k: int) -> str:
        """``x @ W_hat^T`` by the format's ``MatMulNBits`` form (:meth:`WeightFormat.matmul_nbits`): its weight
        inputs as initializers ``{name}.{suffix}`` (float ones in the activation dtype); the 1-bit form also
        multiplies x by alpha first and adds ``(x @ beta) (* row_scale)``."""
        self.packed_weights += 1
        form = fmt.matmul_nbits(packed, n, k)
        hint = name.replace(".", "_")
        weights = [self.const(f"{name}.{suffix}", t.to(self.torch_dtype) if t.is_floating_point() else t)
                   for suffix, t in form.weights.items()]
        xa = x if form.input_scale is None else self.op(
            "Mul", [x, self.const(f"{name}.alpha", form.input_scale.to(self.torch_dtype))])
        y = self.op("MatMulNBits", [xa, *weights], domain=MS_DOMAIN, hint=hint, K=k, N=n, bits=form.bits,
                    block_size=form.block_size, accuracy_level=self.opt.accuracy_level)
        if form.column_term is None:
            return y
        xb = self.op("MatMul", [x, self.const(f"{name}.beta_col", form.column_term.to(self.torch_dtype)[:, None])])
        if form.row_scale is not None:
            xb = self.op("Mul", [xb, self.const(f"{name}.row_scale", form.row_scale.to(self.torch_dtype))])
        return self.op("Add", [y, xb], hint=hint)

    def linear(self, x: str, name: str, n: int, k: int) -> str:
        """``x [..., k] @ W^T (+ bias)`` for the module ``name`` (float ``.weight`` or packed tensors)."""
        fmt = self.formats.get(name)
        if fmt is None:
            w = self.sd[f"{name}.weight"]
            wt = self.const(f"{name}.weight_t", w.to(self.torch_dtype).t().contiguous())
            y = self.op("MatMul", [x, wt], hint=name.replace(".", "_"))
        else:
            packed = {key: self.sd[f"{name}.{key}"] for key in fmt.buffer_specs(1, 1)}
            fmt.check(packed, n, k)
            y = self._matmul_nbits(x, name, packed, fmt, n, k)
        bias = self.sd.get(f"{name}.bias")
        if bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias", bias.to(self.torch_dtype))])
        return y

    def expert_linear(self, x: str, name: str, expert: int, n: int, k: int) -> str:
        """One expert's matrix of the stacked ``name`` (``layers.i.mixer.experts.fc1``/``fc2``)."""
        fmt = self.formats.get(name)
        tag = f"{name}.{expert}"
        if fmt is None:
            w = self.sd[name][expert]
            wt = self.const(f"{tag}.weight_t", w.to(self.torch_dtype).t().contiguous())
            return self.op("MatMul", [x, wt], hint=tag.replace(".", "_"))
        packed = {key: self.sd[f"{name}.{key}"][expert] for key in fmt.buffer_specs(1, 1)}
        fmt.check(packed, n, k)
        return self._matmul_nbits(x, tag, packed, fmt, n, k)

    # ---- norms and activations -----------------------------------------------------------------------
    def rmsnorm(self, x: str, weight_name: str) -> str:
        """fp32 in, fp32 out."""
        sq = self.op("Mul", [x, x])
        ms = self.op("ReduceMean", [sq, self.ints([-1])], keepdims=1)
        eps = self.const(f"eps_{self.cfg.norm_eps}", np.array(self.cfg.norm_eps, dtype=np.float32))
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, eps])])])
        w = self.const(weight_name, self.fp32_param(weight_name))
        return self.op("Mul", [self.op("Mul", [x, inv]), w])

    def final_norm(self, x: str) -> str:
        if self.cfg.final_norm == "rmsnorm":
            return self.rmsnorm(x, "norm_f.weight")
        w = self.const("norm_f.weight", self.fp32_param("norm_f.weight"))
        b = self.const("norm_f.bias", self.fp32_param("norm_f.bias"))
        return self.op("LayerNormalization", [x, w, b], axis=-1, epsilon=float(self.cfg.norm_eps))

    def activation(self, x: str) -> str:
        """The expert activation, computed in fp32 and returned in the activation dtype."""
        xf = self.to_float(x)
        kind = self.cfg.expert_activation
        if kind in ("gelu", "gelu_tanh"):
            y = self.op("Gelu", [xf], approximate="none" if kind == "gelu" else "tanh")
        elif kind == "silu":
            y = self.op("Mul", [xf, self.op("Sigmoid", [xf])])
        else:
            y = self.op("Relu", [xf])
        return self.to_act(y)

    # ---- mixers --------------------------------------------------------------------------------------
    def causal_conv(self, x: str, prefix: str, old_state: str) -> tuple[str, str]:
        """``x [b, L, di]`` -> ``(silu(conv(x)) [b, L, di], new conv state [b, di, W])``."""
        cfg = self.cfg
        di, width = cfg.d_inner, cfg.d_conv
        x_t = self.op("Transpose", [x], perm=[0, 2, 1])                                   # [b, di, L]
        history = self.op("Concat", [old_state, x_t], axis=2)                              # [b, di, W + L]
        new_state = self.op("Slice", [history, self.ints([-width]), self.ints([2 ** 62]), self.ints([2])])
        weight = self.const(f"{prefix}.conv_weight", self.fp32_param(f"{prefix}.conv_weight")[:, None, :])
        bias = [self.const(f"{prefix}.conv_bias", self.fp32_param(f"{prefix}.conv_bias"))] if cfg.conv_bias else []
        past = self.op("Slice", [old_state, self.ints([1]), self.ints([width]), self.ints([2])])  # [b, di, W-1]
        if self.opt.conv_impl == "causal-conv-with-state":
            past_cl = self.to_float(self.op("Transpose", [past], perm=[0, 2, 1]))          # [b, W-1, di]
            inputs = [self.to_float(x), weight, bias[0] if bias else "", past_cl]
            y = self.op("CausalConvWithState", inputs, n_out=2, domain=MS_DOMAIN, channels_last=1,
                        activation="silu")[0]
        else:
            seq = self.to_float(self.op("Concat", [past, x_t], axis=2))                   # [b, di, W-1+L]
            conv = self.op("Conv", [seq, weight, *bias], group=di, kernel_shape=[width])   # [b, di, L]
            conv = self.op("Mul", [conv, self.op("Sigmoid", [conv])])
            y = self.op("Transpose", [conv], perm=[0, 2, 1])
        return self.to_act(y), new_state

    def mamba_mixer(self, x: str, block: BlockSpec, conv_in: str, ssm_in: str) -> tuple[str, str, str]:
        cfg = self.cfg
        d, di, r, n = cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.d_state
        p = block.mixer_name
        old_conv = self.op("Gather", [conv_in, self.scalar_i64(block.slot)], axis=0)      # [b, di, W]
        old_ssm = self.op("Gather", [ssm_in, self.scalar_i64(block.slot)], axis=0)        # [b, di, n]
        xz = self.linear(x, f"{p}.in_proj", 2 * di, d)
        xs, z = self.op("Split", [xz, self.ints([di, di])], n_out=2, axis=-1)
        xc, new_conv = self.causal_conv(xs, p, old_conv)
        dbc = self.linear(xc, f"{p}.x_proj", r + 2 * n, di)
        dt, b_ssm, c_ssm = self.op("Split", [dbc, self.ints([r, n, n])], n_out=3, axis=-1)
        delta = self.linear(dt, f"{p}.dt_proj", di, r)
        a = self.const(f"{p}.A", -torch.exp(self.fp32_param(f"{p}.A_log")))
        d_skip = self.const(f"{p}.D", self.fp32_param(f"{p}.D"))
        dt_bias = self.const(f"{p}.dt_bias", self.fp32_param(f"{p}.dt_bias"))
        y, new_ssm = self.fresh("scan_y"), self.fresh("scan_state")
        self.nodes.append(scan_op.selective_scan_node([xc, delta, a, b_ssm, c_ssm, d_skip, z, dt_bias, old_ssm],
                                                      [y, new_ssm], di, name=f"{p}.selective_scan"))
        key = f"{scan_op.DOMAIN}::{scan_op.OP_TYPE}"
        self.ops_used[key] = self.ops_used.get(key, 0) + 1
        return self.linear(y, f"{p}.out_proj", d, di), new_conv, new_ssm

    def switch_moe(self, x: str, block: BlockSpec) -> str:
        """Top-1 sigmoid-routed experts; every token goes through exactly one expert."""
        cfg = self.cfg
        d, ffn, rows, n_experts = cfg.d_model, cfg.ffn_hidden, cfg.fc1_rows, block.n_experts
        p = block.mixer_name
        x2 = self.op("Reshape", [x, self.ints([-1, d])])                                  # [T, d]
        logits = self.to_float(self.linear(x2, f"{p}.router", n_experts, d))
        probs = self.op("Sigmoid", [logits])
        idx = self.op("ArgMax", [probs], axis=-1, keepdims=0)                              # [T]
        weight = self.op("ReduceMax", [probs, self.ints([-1])], keepdims=0)                # [T]
        outputs, token_rows = [], []
        for e in range(n_experts):
            hit = self.op("Equal", [idx, self.scalar_i64(e)])
            rows_e = self.op("Reshape", [self.op("NonZero", [hit]), self.ints([-1])])      # [T_e]
            xe = self.op("Gather", [x2, rows_e], axis=0)                                   # [T_e, d]
            h = self.expert_linear(xe, f"{p}.experts.fc1", e, rows, d)
            if cfg.expert_gated:
                a, b = self.op("Split", [h, self.ints([ffn, ffn])], n_out=2, axis=-1)
                h = self.op("Mul", [self.activation(a), b])
            else:
                h = self.activation(h)
            outputs.append(self.expert_linear(h, f"{p}.experts.fc2", e, d, ffn))         # [T_e, d]
            token_rows.append(rows_e)
        # every token is in exactly one expert's rows: one scatter puts all results in token order, then each row
        # is scaled by its token's router weight once (the same product per row as scaling each expert's rows)
        all_rows = self.op("Unsqueeze", [self.op("Concat", token_rows, axis=0), self.ints([-1])])   # [T, 1]
        zero = helper.make_tensor("zero", self.elem, [1], [0.0])
        out = self.op("ConstantOfShape", [self.op("Shape", [x2])], value=zero)            # [T, d]
        out = self.op("ScatterND", [out, all_rows, self.op("Concat", outputs, axis=0)])
        out = self.op("Mul", [out, self.to_act(self.op("Unsqueeze", [weight, self.ints([-1])]))])
        return self.op("Reshape", [out, self.op("Shape", [x])])

    # ---- the whole model -----------------------------------------------------------------------------
    def head(self, h: str) -> str:
        cfg = self.cfg
        if "lm_head" in self.formats or (not cfg.tie_embeddings and "lm_head.weight" in self.sd):
            return self.linear(h, "lm_head", cfg.vocab_size, cfg.d_model)
        emb = self.const("embedding.weight", self.act_tensor("embedding.weight"))
        h2 = self.op("Reshape", [h, self.ints([-1, cfg.d_model])])
        logits = self.op("Gemm", [h2, emb], transB=1)                                     # tied: x @ E^T
        lead = self.op("Slice", [self.op("Shape", [h]), self.ints([0]), self.ints([2]), self.ints([0])])
        return self.op("Reshape", [logits, self.op("Concat", [lead, self.ints([cfg.vocab_size])], axis=0)])

    def build(self) -> ModelProto:
        cfg = self.cfg
        n_mamba, di = cfg.n_mamba_layers, cfg.d_inner
        emb = self.const("embedding.weight", self.act_tensor("embedding.weight"))
        h = self.op("Gather", [emb, "input_ids"], axis=0)                                  # [b, L, d]
        residual = None
        conv_outs, ssm_outs = [], []
        for block in block_plan(cfg):
            hf = self.to_float(h)
            residual = hf if residual is None else self.op("Add", [residual, hf])
            x = self.to_act(self.rmsnorm(residual, f"{block.name}.norm.weight"))
            if block.is_mamba:
                h, conv_new, ssm_new = self.mamba_mixer(x, block, "conv_state", "ssm_state")
                conv_outs.append(self.op("Unsqueeze", [conv_new, self.ints([0])]))
                ssm_outs.append(self.op("Unsqueeze", [ssm_new, self.ints([0])]))
            else:
                h = self.switch_moe(x, block)
        residual = self.op("Add", [residual, self.to_float(h)])
        logits = self.head(self.to_act(self.final_norm(residual)))
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        for outs, name in ((conv_outs, "conv_state_out"), (ssm_outs, "ssm_state_out")):
            self.nodes.append(helper.make_node("Concat", outs, [name], axis=0) if len(outs) > 1
                              else helper.make_node("Identity", outs, [name]))
        f = TensorProto.FLOAT
        conv_shape = [n_mamba, "batch", di, cfg.d_conv]
        ssm_shape = [n_mamba, "batch", di, cfg.d_state]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
                  helper.make_tensor_value_info("conv_state", self.elem, conv_shape),
                  helper.make_tensor_value_info("ssm_state", f, ssm_shape)]
        outputs = [helper.make_tensor_value_info("logits", self.elem, ["batch", "length", cfg.vocab_size]),
                   helper.make_tensor_value_info("conv_state_out", self.elem, conv_shape),
                   helper.make_tensor_value_info("ssm_state_out", f, ssm_shape)]
        graph = helper.make_graph(self.nodes, "qmamba", inputs, outputs, initializer=self.initializers)
        imports = [helper.make_opsetid("", self.opt.opset), helper.make_opsetid(scan_op.DOMAIN, 1)]
        if any(node.domain == MS_DOMAIN for node in self.nodes) or self.opt.scan == "linear-attention":
            imports.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=imports, producer_name="qmamba",
                                  functions=[scan_op.selective_scan_function(self.opt.scan, self.opt.opset)],
                                  ir_version=scan_op.ir_version_for(imports))
        meta = {"qmamba.config": cfg.to_json(), "qmamba.scan_body": self.opt.scan, "qmamba.dtype": self.opt.dtype,
                "qmamba.conv": self.opt.conv_impl,
                "qmamba.quantization": ",".join(f"{k}={v.describe()}" for k, v in sorted(self.formats.items()))}
        helper.set_model_props(model, meta)
        return model


def build_model_proto(cfg: ModelConfig, state_dict: dict, manifest: dict | None,
                      options: ExportOptions | None = None) -> ModelProto:
    """The ONNX model of a checkpoint's ``(config, state_dict, manifest)`` (tensors are copied)."""
    quantization = (manifest or {}).get("quantization") or None
    return GraphBuilder(cfg, state_dict, quantization, options or ExportOptions()).build()
