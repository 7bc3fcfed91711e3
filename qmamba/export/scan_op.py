"""The ``qmamba::SelectiveScan`` operator: one graph node per Mamba layer, plus a model-local FunctionProto of the
same domain/name so that stock onnxruntime (and ``onnx.reference`` for the Scan body) can run it.

Node signature (all shapes token-major, as the projections produce them)::

    y, final_state = qmamba::SelectiveScan(u, delta, A, B, C, D, z, dt_bias, initial_state)   attr d_inner:int
      u, delta, z [batch, L, d_inner]  (activation dtype)      B, C [batch, L, d_state]  (activation dtype)
      A [d_inner, d_state] fp32 (already -exp(A_log))          D, dt_bias [d_inner] fp32
      initial_state, final_state [batch, d_inner, d_state] fp32     y [batch, L, d_inner] (dtype of u)

Math (fp32): ``dt = softplus(delta + dt_bias)``; ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``;
``y_t = (<C_t, h_t> + D u_t) * silu(z_t)`` -- the same as :func:`qmamba.kernels.selective_scan.selective_scan_ref`.

Two function bodies, chosen at export:

* ``"linear-attention"`` (default): ``com.microsoft.LinearAttention`` with ``update_rule="gated"`` computes the
  recurrence exactly: one head per channel (``q_num_heads = kv_num_heads = d_inner``), ``d_k = d_state``,
  ``d_v = 1``, ``q = C`` broadcast over channels, ``k = dt (x) B``, ``v = u``, ``decay = dt (x) A`` (log space,
  per key dim), ``scale = 1``. ORT CPU and CUDA EPs.
* ``"scan"``: standard ONNX ``Scan`` over time with the state as the loop carry (portable; runs in
  ``onnx.reference``). The per-step factors ``exp(dt A)`` and ``dt u B`` are computed for the whole sequence
  first, so the body is two element-wise ops and a reduction.

The chunked cumsum/exp formulation is deliberately not offered: it overflows in fp32 as chunks grow.
"""

from __future__ import annotations

from onnx import AttributeProto, FunctionProto, TensorProto, helper

DOMAIN = "qmamba"
OP_TYPE = "SelectiveScan"
DOMAIN_VERSION = 1
MS_DOMAIN = "com.microsoft"
SCAN_BODIES = ("linear-attention", "scan")
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
OUTPUTS = ("y", "final_state")


def selective_scan_node(inputs: list[str], outputs: list[str], d_inner: int, name: str):
    """The one graph node of a Mamba layer's scan (``inputs``/``outputs`` in the order of INPUTS/OUTPUTS)."""
    if len(inputs) != len(INPUTS) or len(outputs) != len(OUTPUTS):
        raise ValueError(f"SelectiveScan takes {len(INPUTS)} inputs and {len(OUTPUTS)} outputs")
    return helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=DOMAIN, d_inner=int(d_inner))


def _const_ints(name: str, values: list[int]):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                              [len(values)], values))


def _common_prologue() -> list:
    """fp32 copies of the inputs and ``dt = softplus(delta + dt_bias)`` ([b, L, di])."""
    f = TensorProto.FLOAT
    return [
        helper.make_node("Cast", ["u"], ["uf"], to=f),
        helper.make_node("Cast", ["delta"], ["delta_f"], to=f),
        helper.make_node("Cast", ["B"], ["Bf"], to=f),
        helper.make_node("Cast", ["C"], ["Cf"], to=f),
        helper.make_node("Cast", ["z"], ["zf"], to=f),
        helper.make_node("Add", ["delta_f", "dt_bias"], ["delta_b"]),
        helper.make_node("Softplus", ["delta_b"], ["dt"]),
        _const_ints("ax_last", [-1]),
        _const_ints("ax_2", [2]),
        helper.make_node("Unsqueeze", ["dt", "ax_last"], ["dt4"]),        # [b, L, di, 1]
        helper.make_node("Unsqueeze", ["Bf", "ax_2"], ["B4"]),            # [b, L, 1, n]
        helper.make_node("Mul", ["dt4", "A"], ["dA_log"]),                # [b, L, di, n]
    ]


def _common_epilogue(scan_out: str) -> list:
    """``y = (scan_out + D u) * silu(z)`` cast back to the dtype of ``u``."""
    return [
        helper.make_node("Mul", ["uf", "D"], ["Du"]),
        helper.make_node("Add", [scan_out, "Du"], ["y_skip"]),
        helper.make_node("Sigmoid", ["zf"], ["z_sig"]),
        helper.make_node("Mul", ["zf", "z_sig"], ["z_silu"]),
        helper.make_node("Mul", ["y_skip", "z_silu"], ["y_f"]),
        helper.make_node("CastLike", ["y_f", "u"], ["y"]),
    ]


def _linear_attention_nodes() -> list:
    nodes = _common_prologue()
    nodes += [
        _const_ints("flat3", [0, 0, -1]),
        helper.make_node("Reshape", ["dA_log", "flat3"], ["decay"]),       # [b, L, di*n]
        helper.make_node("Mul", ["dt4", "B4"], ["k4"]),                    # [b, L, di, n]
        helper.make_node("Reshape", ["k4", "flat3"], ["k"]),
        helper.make_node("Unsqueeze", ["Cf", "ax_2"], ["C4"]),            # [b, L, 1, n]
        helper.make_node("Shape", ["k4"], ["k4_shape"]),
        helper.make_node("Expand", ["C4", "k4_shape"], ["q4"]),
        helper.make_node("Reshape", ["q4", "flat3"], ["q"]),
        helper.make_node("Unsqueeze", ["initial_state", "ax_last"], ["past"]),  # [b, di, n, 1]
        helper.make_node("LinearAttention", ["q", "k", "uf", "past", "decay"], ["la_out", "present"],
                         domain=MS_DOMAIN, update_rule="gated", scale=1.0),
        helper.make_node("Squeeze", ["present", "ax_last"], ["final_state"]),
    ]
    # q_num_heads / kv_num_heads come from the node's d_inner attribute
    la = nodes[-2]
    for attr_name in ("q_num_heads", "kv_num_heads"):
        ref = AttributeProto()
        ref.name, ref.ref_attr_name, ref.type = attr_name, "d_inner", AttributeProto.INT
        la.attribute.append(ref)
    return nodes + _common_epilogue("la_out")


def _scan_body_graph():
    """One time step: ``h = a * h_prev + b``; ``y = sum_n(h * c)``. a, b [b, di, n]; c [b, n]."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["a_t", "h_prev"], ["ah"]),
        helper.make_node("Add", ["ah", "b_t"], ["h_next"]),
        _const_ints("ax1", [1]),
        helper.make_node("Unsqueeze", ["c_t", "ax1"], ["c3"]),
        helper.make_node("Mul", ["h_next", "c3"], ["hc"]),
        _const_ints("ax_n", [-1]),
        helper.make_node("ReduceSum", ["hc", "ax_n"], ["y_t"], keepdims=0),
    ]
    return helper.make_graph(
        nodes, "selective_scan_step",
        [helper.make_tensor_value_info("h_prev", f, None), helper.make_tensor_value_info("a_t", f, None),
         helper.make_tensor_value_info("b_t", f, None), helper.make_tensor_value_info("c_t", f, None)],
        [helper.make_tensor_value_info("h_next", f, None), helper.make_tensor_value_info("y_t", f, None)])


def _scan_nodes() -> list:
    nodes = _common_prologue()
    nodes += [
        helper.make_node("Exp", ["dA_log"], ["dA"]),                      # [b, L, di, n]
        helper.make_node("Mul", ["dt", "uf"], ["dt_u"]),                  # [b, L, di]
        helper.make_node("Unsqueeze", ["dt_u", "ax_last"], ["dt_u4"]),
        helper.make_node("Mul", ["dt_u4", "B4"], ["dBu"]),               # [b, L, di, n]
        # time-major copies: onnx.reference's Scan only iterates over axis 0
        helper.make_node("Transpose", ["dA"], ["dA_t"], perm=[1, 0, 2, 3]),
        helper.make_node("Transpose", ["dBu"], ["dBu_t"], perm=[1, 0, 2, 3]),
        helper.make_node("Transpose", ["Cf"], ["Cf_t"], perm=[1, 0, 2]),
        helper.make_node("Scan", ["initial_state", "dA_t", "dBu_t", "Cf_t"], ["final_state", "scan_y_t"],
                         num_scan_inputs=3, body=_scan_body_graph()),
        helper.make_node("Transpose", ["scan_y_t"], ["scan_y"], perm=[1, 0, 2]),   # [b, L, di]
    ]
    return nodes + _common_epilogue("scan_y")


def selective_scan_function(body: str, opset: int) -> FunctionProto:
    """The model-local FunctionProto ``qmamba::SelectiveScan`` with the chosen ``body`` (see SCAN_BODIES)."""
    if body == "linear-attention":
        nodes = _linear_attention_nodes()
        imports = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
    elif body == "scan":
        nodes = _scan_nodes()
        imports = [helper.make_opsetid("", opset)]
    else:
        raise ValueError(f"unknown scan body {body!r}; choose from {SCAN_BODIES}")
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), nodes, imports,
                                attributes=["d_inner"],
                                doc_string=f"Mamba-1 selective scan ({body} body); see qmamba/export/scan_op.py")


def standalone_scan_model(body: str, d_inner: int, d_state: int, opset: int = 21, elem_type=TensorProto.FLOAT):
    """A model holding one SelectiveScan node with dynamic batch and length (tests, kernel checks)."""
    f = TensorProto.FLOAT
    seq = ["batch", "length"]
    inputs = [
        helper.make_tensor_value_info("u", elem_type, [*seq, d_inner]),
        helper.make_tensor_value_info("delta", elem_type, [*seq, d_inner]),
        helper.make_tensor_value_info("A", f, [d_inner, d_state]),
        helper.make_tensor_value_info("B", elem_type, [*seq, d_state]),
        helper.make_tensor_value_info("C", elem_type, [*seq, d_state]),
        helper.make_tensor_value_info("D", f, [d_inner]),
        helper.make_tensor_value_info("z", elem_type, [*seq, d_inner]),
        helper.make_tensor_value_info("dt_bias", f, [d_inner]),
        helper.make_tensor_value_info("initial_state", f, ["batch", d_inner, d_state]),
    ]
    outputs = [helper.make_tensor_value_info("y", elem_type, [*seq, d_inner]),
               helper.make_tensor_value_info("final_state", f, ["batch", d_inner, d_state])]
    node = selective_scan_node(list(INPUTS), list(OUTPUTS), d_inner, "scan")
    graph = helper.make_graph([node], "selective_scan", inputs, outputs)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    if body == "linear-attention":
        imports.append(helper.make_opsetid(MS_DOMAIN, 1))
    return helper.make_model(graph, opset_imports=imports, functions=[selective_scan_function(body, opset)],
                             producer_name="qmamba", ir_version=ir_version_for(imports))


def ir_version_for(opset_imports) -> int:
    """The lowest IR version that carries ``opset_imports`` (stock onnx would stamp its newest, which older
    onnxruntime builds refuse)."""
    return max(7, helper.find_min_ir_version_for(list(opset_imports), ignore_unknown=True))
