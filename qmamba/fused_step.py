"""One fused single-token step of a whole :class:`qmamba.model.MambaLM`, built for CUDA-graph capture.

:class:`FusedDecodeStep` walks the model's block plan (``model.blocks``) once, at construction, and then runs a
step as a short, fixed sequence of Triton launches with no allocation and no host synchronisation:

    per Mamba layer (5):  residual add + RMSNorm (embedding gather fused into the first layer's) -> [in_proj with
                          the conv step of its x rows from the old conv state in the epilogue] -> x_proj ->
                          [conv state shift + dt_proj + softplus + SSM state update (in place) + D skip + SiLU(z)
                          gate] -> out_proj
    per MoE layer (3):    residual add + RMSNorm + router logits + sigmoid/argmax (one kernel) -> [fc1 of the chosen
                          expert (read by index), gate and up rows together, gated activation in the epilogue] ->
                          fc2 with the routing weight in the epilogue
    end (2):              residual add + final norm -> lm_head

With ``DecodePolicy.norm_in_gemvs`` (one row) the add + norm between two layers is not a launch of its own: the
GEMV before it (out_proj, fc2) adds its output to the residual and writes ``u = residual * norm weight`` with the
sum of squares and the next router's sums by atomic adds (:class:`qmamba.kernels.decode_linear.NormOut`); the GEMVs
after it multiply their products by ``1 / rms`` and fc1 / fc2 take the route from the sums (``NormIn``): a linear
layer of the normed row is ``1 / rms`` times the same layer of ``u``. Only the first layer's add + norm (the
embedding; it also zeroes the sums) and a LayerNorm final norm (BlackMamba's) stay kernels.

The linear layers are :func:`qmamba.kernels.decode_linear.decode_linear` (whole rows per program, no split-K, no
workspace to zero); on Hopper every kernel is a programmatic dependent launch, so inside the CUDA graph each
kernel's weight loads overlap the previous kernel (:class:`DecodePolicy`, an explicit argument), and with
``DecodePolicy.early_reads`` so do its reads of what was written two launches or more before it (each kernel waits
for the one before it before letting the next start): the SSM update's x, z and states, in_proj's conv state and
weights. Weights are read in
their stored formats (float, int8, int4, 1-bit); with ``DecodePolicy.int4_planes`` (the CUDA default) the model's
int4 weights of group size 128 / 256 are first converted in place to plane words
(:func:`qmamba.quant.modules.use_plane_words`: the same bytes, the layout the kernels read, every other path
unchanged). What the policy does not take (on CUDA today: int4 groups below 128, dense matrices at batch 2+ and 1-bit
weights at batch 2+, routed or not) runs on the general matmul kernels (:func:`dequant_matmul`,
:func:`binary_matmul`, which read plane words too) with the conv step and the activation as their own launches
(x_proj too when in_proj is not taken); with ``DecodePolicy.pdl_general`` (the CUDA default since session 39) these
are programmatic dependent launches as well, so the chain of early launches runs through the whole batched step.
With ``DecodePolicy.int8_rows``, at 2+ rows, a model with int8 activations (``model.int8_activations``) runs its
gated int4 fc1 on the W4A8 row programs (:func:`qmamba.kernels.w4a8_rows.w4a8_rows`, ``dp4a``): the add + norm before
it quantizes x to int8 per row instead of writing its input planes; the reference path rounds fc1's input the same
way in a batched step (:class:`qmamba.quant.modules.QuantExperts`). With ``DecodePolicy.int8_rows_fc2`` as well, fc2
runs there too, on fc1's output quantized to int8 per row by a launch between them (the reference rounds it too;
both on in the CUDA policy since session 48); with ``int8_rows_fc2_norm`` (on since session 51) fc2's last program
of each row ends it with the add + norm after the MoE layer, which then has no launch of its own.
The module parameters are captured by reference at construction: rebuild the step after changing weights.
Logits come back as float32 ``[B, V]``; the flat state tensors are updated in place.
The kernels themselves (tensors in, tensors out) live in :mod:`qmamba.kernels.decode_step` and beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from qmamba.kernel_view import dense_weight, expert_weight, linear_weight
from qmamba.kernels.causal_conv1d import causal_conv1d_update_triton
from qmamba.kernels.decode_linear import NormIn, NormOut, binary_denorm_of, decode_linear
from qmamba.kernels.decode_policy import DecodePolicy
from qmamba.kernels.decode_step import add_norm, aligned_rows, dt_state_update
from qmamba.kernels.fused_moe import gated_act, routed_matmul
from qmamba.kernels.row_norm import RowAddNorm
from qmamba.kernels.w4a8_gemm import int8_rows_buffers, quantize_rows_int8
from qmamba.kernels.w4a8_rows import w4a8_rows
from qmamba.kernels.weights import FMT_INT4_PLANES, BinaryWeight, PackedWeight
from qmamba.quant.layout import INT4_TILE, INT4_X_PLANES, int4_x_planes_width
from qmamba.quant.modules import use_plane_words


# ---- plan --------------------------------------------------------------------------------------------------------------
KernelWeight = PackedWeight | BinaryWeight


@dataclass
class _MambaPlan:
    slot: int
    norm_w: torch.Tensor
    in_proj: KernelWeight
    in_bias: torch.Tensor | None
    conv_w: torch.Tensor
    conv_b: torch.Tensor | None
    x_proj: KernelWeight
    dt_w: torch.Tensor
    dt_bias: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor
    out_proj: KernelWeight
    out_bias: torch.Tensor | None


@dataclass
class _MoePlan:
    norm_w: torch.Tensor
    router_w: torch.Tensor
    router_b: torch.Tensor | None
    fc1: KernelWeight
    fc2: KernelWeight
    activation: str
    gated: bool


def _mamba_plan(block, dtype, align_dt: bool = False) -> _MambaPlan:
    """The kernel view of one Mamba block of ``model.blocks``; ``align_dt``: dt_proj's weight with its rows padded to
    a multiple of 16 elements (``DecodePolicy.dt_rows_aligned``)."""
    mixer = block.mixer
    dt_w = dense_weight(mixer.dt_proj, dtype).contiguous()
    in_w, in_b = linear_weight(mixer.in_proj)
    x_w, _ = linear_weight(mixer.x_proj)
    out_w, out_b = linear_weight(mixer.out_proj)
    return _MambaPlan(
        block.slot, block.norm.weight.detach(), in_w, in_b, mixer.conv_weight.detach().contiguous(),
        None if mixer.conv_bias is None else mixer.conv_bias.detach(), x_w,
        aligned_rows(dt_w) if align_dt else dt_w, mixer.dt_bias.detach(),
        mixer.ssm_A().detach().contiguous(), mixer.D.detach(), out_w, out_b)


def _moe_plan(block, dtype) -> _MoePlan:
    """The kernel view of one MoE block of ``model.blocks``."""
    mixer = block.mixer
    router = mixer.router
    return _MoePlan(
        block.norm.weight.detach(), dense_weight(router, dtype).contiguous(),
        None if router.bias is None else router.bias.detach(), expert_weight(mixer.experts, "fc1"),
        expert_weight(mixer.experts, "fc2"), mixer.experts.activation, mixer.experts.gated)


def _layer_weights(plan) -> tuple:
    """A layer plan's linear weights in forward order (their outputs get the layer's workspace views)."""
    return (plan.in_proj, plan.x_proj, plan.out_proj) if isinstance(plan, _MambaPlan) else (plan.fc1, plan.fc2)


class FusedDecodeStep:
    """``step(token_ids [B], state) -> logits [B, V]`` fp32, state updated in place; see the module docstring."""

    def __init__(self, model: nn.Module, policy: DecodePolicy | None = None):
        cfg = model.config
        self.model = model
        self.policy = policy or DecodePolicy.for_device(model.device)
        self.dtype = model.compute_dtype
        self.d_model, self.vocab = cfg.d_model, cfg.vocab_size
        self.eps = float(cfg.norm_eps)
        self.embedding = model.embedding.weight.detach()
        self.int8_activations = bool(getattr(model, "int8_activations", False))
        self.int8_inputs_log: list | None = None  # a check's record: the int8 inputs of fc1 / fc2 as (codes, scale, K)
        #   (a graph's capture records copies its replays rewrite: qmamba.bench.recording_int8_inputs dequantizes them)
        if self.policy.int4_planes:  # int4 weights to the plane words the kernels read, in place (no copy)
            use_plane_words(model)
        self.layers = [_mamba_plan(block, self.dtype, self.policy.dt_rows_aligned) if block.is_mamba
                       else _moe_plan(block, self.dtype)
                       for block in model.blocks]
        norm_f = model.norm_f
        self.final_w = norm_f.weight.detach()
        self.final_b = getattr(norm_f, "bias", None)  # LayerNorm has a bias, RMSNorm none
        self.head, self.head_bias = linear_weight(model.lm_head)
        self._buffers: dict[int, dict] = {}
        for w in self._weights():  # the 1-bit "denorm" vectors now, not inside a CUDA-graph capture
            if isinstance(w, BinaryWeight) and self.policy.denorm_reading and self.policy.takes(w, 1):
                binary_denorm_of(w)

    def _weights(self) -> list:
        """Every linear weight of a step: the head, then each layer's in forward order."""
        return [self.head] + [w for plan in self.layers for w in _layer_weights(plan)]

    # ---- buffers -------------------------------------------------------------------------------------------------
    def _workspace(self, batch: int, device) -> dict:
        """Per-batch-size buffers: per-layer matmul outputs in one float32 workspace (zeroed once per step when a
        general split-K kernel accumulates into it), plus activations."""
        if batch in self._buffers:
            return self._buffers[batch]
        sizes = [tuple(w.n for w in _layer_weights(plan)) for plan in self.layers]
        total = sum(sum(s) for s in sizes) + self.head.n
        ws = torch.zeros(total * batch, device=device, dtype=torch.float32)
        views, off = [], 0
        for s in sizes:
            layer = []
            for n in s:
                layer.append(ws[off:off + n * batch].view(batch, n))
                off += n * batch
            views.append(layer)
        logits = ws[off:off + self.head.n * batch].view(batch, self.head.n)
        d = self.d_model
        di = max((p.in_proj.n // 2 for p in self.layers if isinstance(p, _MambaPlan)), default=1)
        ffn = max((p.fc1.n // (2 if p.gated else 1) for p in self.layers if isinstance(p, _MoePlan)), default=1)
        f32, act = dict(device=device, dtype=torch.float32), dict(device=device, dtype=self.dtype)
        buf = dict(ws=ws, views=views, logits=logits, zero=not all(self.policy.takes(w, batch) for w in self._weights()),
                   xq=None, aq=None,
                   residual=torch.empty(2, batch, d, **f32), x=torch.empty(batch, d, **act),
                   xc=torch.empty(batch, di, **act), y=torch.empty(batch, di, **act), act=torch.empty(batch, ffn, **act),
                   conv_scratch=None, idx=torch.empty(batch, device=device, dtype=torch.int32),
                   rwt=torch.empty(batch, **f32), xpl=None, acc=None, zeroed=None, wx=None, wy=None, wa=None)
        if any(self._int8_fc1(p, batch) for p in self.layers):  # x quantized to int8 by the add + norms
            buf["xq"] = int8_rows_buffers(batch, -(-d // INT4_TILE) * INT4_TILE, device)
        if any(self._int8_fc2(p, batch) for p in self.layers):  # fc1's output quantized to int8 for fc2
            buf["aq"] = int8_rows_buffers(batch, -(-ffn // INT4_TILE) * INT4_TILE, device)
            # fc2's programs of a row counted, where the last one ends it with the add + norm after (int8_rows_fc2_norm)
            buf["ncnt"] = torch.zeros(batch, device=device, dtype=torch.int32)
        if any(self._planes_read(w, batch, routed) and not (routed and self._int8_fc1(p, batch))
               for (w, routed), p in zip(self._x_readers(), [None] + self.layers)):
            # the int4 input planes of x, written by each add + norm, for the plane-word matrices that read x one row
            # a program (batch 1; routed experts as row programs at any batch)
            buf["xpl"] = torch.zeros(batch, INT4_X_PLANES, int4_x_planes_width(d), **f32)
        buf["ypl"], buf["apl"] = self._producer_planes(batch, di, ffn, f32)
        if self._norm_in_gemvs(batch):  # per add + norm: the sum of squares and the router sums (NormOut)
            self._norm_sums(buf, f32)
        self._buffers[batch] = buf
        return buf

    def _norm_sums(self, buf, f32: dict):
        """The step's accumulators, in one buffer the first add + norm zeroes (``buf["zeroed"]``): the norm sums of
        each add + norm (``buf["acc"]``: sum of squares, router sums) and, with
        :attr:`DecodePolicy.producer_word_sums`, the word sums of each producer's input planes, a row per call
        (``buf["wx"][call]``: NormOut's planes of x; ``buf["wy"][layer]``: the SSM update's of y;
        ``buf["wa"][layer]``: fc1's of its activation), added there by atomic adds and read by their consumer
        instead of each summing its words itself."""
        n = len(self.layers)
        experts = max((p.router_w.shape[0] for p in self.layers if isinstance(p, _MoePlan)), default=0)
        rows = [("acc", n + 1, 1 + experts)]
        if self.policy.producer_word_sums:
            mamba = [i for i, p in enumerate(self.layers) if isinstance(p, _MambaPlan)]
            moe = [i for i, p in enumerate(self.layers) if isinstance(p, _MoePlan)]
            for key, planes, count in (("wx", buf["xpl"], n + 1), ("wy", buf["ypl"], len(mamba)),
                                       ("wa", buf["apl"], len(moe))):
                if planes is not None:
                    rows.append((key, count, planes.shape[-1] // 8))
        zeroed = torch.zeros(sum(r * w for _, r, w in rows), **f32)
        off = 0
        for key, count, width in rows:
            view = zeroed[off:off + count * width].view(count, 1, width) if key != "acc" else \
                zeroed[off:off + count * width].view(count, width)
            off += count * width
            if key == "wy":
                view = dict(zip(mamba, view))
            elif key == "wa":
                view = dict(zip(moe, view))
            buf[key] = view
        buf["zeroed"] = zeroed

    def _planes_read(self, weight, batch: int, routed: bool = False) -> bool:
        """Whether ``weight`` reads its input as int4 input planes at this batch (:attr:`DecodePolicy.int4_x_planes`:
        plane words on the decode kernels, one row a program)."""
        return self.policy.int4_x_planes and getattr(weight, "fmt", None) == FMT_INT4_PLANES and \
            self.policy.takes(weight, batch, routed) and (batch == 1 or (routed and self.policy.routed_row_programs))

    def _int8_fc1(self, plan, batch: int) -> bool:
        """Whether ``plan`` (a layer's plan, or None) is an MoE whose fc1 runs on the W4A8 row programs at this batch
        (:attr:`DecodePolicy.int8_rows`, the model's ``int8_activations``, 2+ rows, a gated fc1 of int4 plane words
        with groups a multiple of 128 that the decode kernels take)."""
        if not (self.policy.int8_rows and self.int8_activations and batch >= 2 and isinstance(plan, _MoePlan)):
            return False
        fc1 = plan.fc1
        return (plan.gated and getattr(fc1, "fmt", None) == FMT_INT4_PLANES and fc1.group_size % INT4_TILE == 0
                and self.policy.takes(fc1, batch, routed=True))

    def _int8_fc2(self, plan, batch: int) -> bool:
        """Whether ``plan``'s fc2 runs on the W4A8 row programs at this batch too (:attr:`DecodePolicy.int8_rows_fc2`,
        its fc1 on them, fc2 int4 plane words with groups a multiple of 128), its input quantized to int8 per row by
        a launch of its own."""
        if not (self.policy.int8_rows_fc2 and self._int8_fc1(plan, batch)):
            return False
        fc2 = plan.fc2
        return getattr(fc2, "fmt", None) == FMT_INT4_PLANES and fc2.group_size % INT4_TILE == 0

    def int8_rows_layers(self, batch: int) -> int:
        """How many MoE layers run fc1 on int8 codes at ``batch`` rows (see :meth:`_int8_fc1`): with
        ``int8_inputs_log`` set, each such layer records there, one a step, ``(fc1's input, fc2's input or None)`` as
        the W4A8 kernels multiply them, each ``(codes, scale, K)`` (fc2's where it runs on int8 codes too,
        :meth:`_int8_fc2`)."""
        return sum(self._int8_fc1(plan, batch) for plan in self.layers)

    def _producer_planes(self, batch: int, di: int, ffn: int, f32: dict):
        """The input planes out_proj (written by the SSM update) and fc2 (by fc1's epilogue) read, or None: where
        every layer's matrix reads them (one width for all layers) and, for fc2, every fc1 runs on the decode
        kernels."""
        mamba = [p for p in self.layers if isinstance(p, _MambaPlan)]
        moe = [p for p in self.layers if isinstance(p, _MoePlan)]
        ypl = apl = None
        if mamba and all(p.in_proj.n // 2 == di and self._planes_read(p.out_proj, batch) for p in mamba):
            ypl = torch.zeros(batch, INT4_X_PLANES, int4_x_planes_width(di), **f32)
        if moe and all(p.gated and p.fc1.n // 2 == ffn and self.policy.takes(p.fc1, batch, routed=True) and
                       self._planes_read(p.fc2, batch, routed=True) and not self._int8_fc2(p, batch) for p in moe):
            apl = torch.zeros(batch, INT4_X_PLANES, int4_x_planes_width(ffn), **f32)
        return ypl, apl

    def _norm_in_gemvs(self, batch: int) -> bool:
        """Whether the add + norm between two layers runs in the GEMVs around it (:attr:`DecodePolicy.norm_in_gemvs`):
        one row, RMSNorm blocks, and every producer (out_proj, fc2) and consumer (in_proj with x_proj, gated fc1,
        fc2; the head too where the final norm is an RMSNorm) on the decode kernels; with 1-bit weights only if
        :attr:`DecodePolicy.norm_in_gemvs_binary`."""
        if not self.policy.norm_in_gemvs or batch != 1 or len(self.layers) < 2:
            return False
        if not self.policy.norm_in_gemvs_binary and any(isinstance(w, BinaryWeight) for w in self._weights()):
            return False
        takes = self.policy.takes
        for plan in self.layers:
            if isinstance(plan, _MambaPlan):
                ok = takes(plan.in_proj, 1) and takes(plan.x_proj, 1) and takes(plan.out_proj, 1)
            else:
                ok = plan.gated and takes(plan.fc1, 1, routed=True) and takes(plan.fc2, 1, routed=True)
            if not ok:
                return False
        return self.final_b is not None or takes(self.head, 1)

    def _live_residual(self, buf):
        """The residual buffer the NormOut epilogues update in place (after the first add + norm wrote it)."""
        return buf["residual"][1 if self._split_planes(buf) else 0]

    def _fc2_add_norm(self, buf, layer: int, batch: int) -> RowAddNorm | None:
        """The add + norm after MoE layer ``layer`` for its fc2's last programs of a row to end with
        (:attr:`DecodePolicy.int8_rows_fc2_norm`), or None where it stays a launch: fc2 on the W4A8 row programs and
        a plain add + norm next (the next layer a Mamba one or the final norm; no planes, no norms in the GEMVs)."""
        if not (self.policy.int8_rows_fc2_norm and self._int8_fc2(self.layers[layer], batch)):
            return None
        if buf["acc"] is not None or buf["xpl"] is not None:
            return None
        if layer + 1 < len(self.layers):
            nxt = self.layers[layer + 1]
            if isinstance(nxt, _MoePlan):  # (a router and int8 codes of x: add_norm's own)
                return None
            norm_w, norm_b = nxt.norm_w, None
        else:
            norm_w, norm_b = self.final_w, self.final_b
        return RowAddNorm(buf["residual"][0], norm_w, norm_b, buf["x"], self.eps, buf["ncnt"])

    def _split_planes(self, buf) -> bool:
        return self.policy.norm_plane_programs > 1 and buf["xpl"] is not None

    def _norm_out(self, buf, call: int):
        """The :class:`NormOut` of the ``call``-th add + norm (the producer before layer ``call``, or the final
        norm's at ``len(layers)``), or None where it stays a kernel (a LayerNorm final norm)."""
        if call == len(self.layers):
            if self.final_b is not None:
                return None
            norm_w, router = self.final_w, None
        else:
            plan = self.layers[call]
            norm_w = plan.norm_w
            router = plan.router_w if isinstance(plan, _MoePlan) else None
        return NormOut(self._live_residual(buf), norm_w, buf["acc"][call], buf["x"], planes=buf["xpl"],
                       router_w=router, word_sums=self._sums(buf, "wx", call))

    @staticmethod
    def _sums(buf, key: str, index: int):
        """The word-sum row ``buf[key][index]`` (:meth:`_norm_sums`), or None where there is none."""
        rows = buf[key]
        if rows is None:
            return None
        return rows.get(index) if isinstance(rows, dict) else rows[index]

    def _norm_in(self, buf, call: int) -> NormIn:
        return NormIn(buf["acc"][call], self.d_model, self.eps)

    @staticmethod
    def _route(nin: NormIn, plan: _MoePlan, scale: bool) -> NormIn:
        """``nin`` routing an MoE layer's experts from its sums: the sums row cut to this router's experts (the
        workspace's rows are as wide as the widest router; a zero past this one's would be a sigmoid of 0.5)."""
        experts = plan.router_w.shape[0]
        return dataclasses.replace(nin, acc=nin.acc[:1 + experts], scale=scale, route=True, router_b=plan.router_b)

    def _x_readers(self) -> list:
        """``(weight, routed)`` of the matrices whose input is an add + norm's output: in_proj, fc1, the head."""
        return [(self.head, False)] + [(p.in_proj, False) if isinstance(p, _MambaPlan) else (p.fc1, True)
                                       for p in self.layers]

    # ---- one step --------------------------------------------------------------------------------------------------
    def _add_norm(self, buf, h, ids, norm_w, call: int, router=None, norm_b=None, x_int8: bool = False):
        """The ``call``-th add + norm of the step. Where several programs a row share the writing of the int4 input
        planes (``DecodePolicy.norm_plane_programs``), the residual alternates between two buffers (each program
        reads it whole; the first writes the new one); otherwise it is updated in place. With the norms in the
        GEMVs (``buf["acc"]``) the first also zeroes their sums, and a last one reads the live residual. ``x_int8``:
        x also quantized to int8 (``buf["xq"]``) for an fc1 on the W4A8 row programs."""
        rw, rb = router if router is not None else (None, None)
        split = self._split_planes(buf)
        src = call % 2
        if buf["acc"] is not None and call > 0:  # (the NormOut epilogues since the first kept it in one buffer)
            src = 1 if split else 0
        res_in = buf["residual"][src if split else 0]
        res_out = buf["residual"][1 - src] if split else None
        add_norm(buf["x"], res_in, norm_w, self.eps, h=h, token_ids=ids, embedding=self.embedding,
                 norm_b=norm_b, router_w=rw, router_b=rb, expert_idx=buf["idx"], expert_weight=buf["rwt"],
                 pdl=self.policy.pdl, x_planes=buf["xpl"], plane_programs=self.policy.norm_plane_programs,
                 residual_out=res_out, zero=buf["zeroed"] if buf["acc"] is not None and call == 0 else None,
                 x_int8=buf["xq"] if x_int8 else None)

    def __call__(self, token_ids: torch.Tensor, state) -> torch.Tensor:
        token_ids = token_ids.contiguous()  # the gather kernel reads ids[b] at offset b (a column slice is strided)
        batch = token_ids.shape[0]
        buf = self._workspace(batch, token_ids.device)
        if buf["zero"]:
            buf["ws"].zero_()
        fused = buf["acc"] is not None  # the add + norms between layers in the GEMVs around them (NormOut / NormIn)
        h = None
        n = len(self.layers)
        normed = False  # the add + norm of this call already ended the last layer's fc2 (int8_rows_fc2_norm)
        for i, plan in enumerate(self.layers):
            views = buf["views"][i]
            moe = isinstance(plan, _MoePlan)
            if (not fused or i == 0) and not normed:
                self._add_norm(buf, h, token_ids, plan.norm_w, i,
                               router=(plan.router_w, plan.router_b) if moe else None,
                               x_int8=self._int8_fc1(plan, batch))
            nin = self._norm_in(buf, i) if fused and i > 0 else None
            nout = self._norm_out(buf, i + 1) if fused else None
            if moe:
                end_norm = self._fc2_add_norm(buf, i, batch)
                h = self._moe(buf, plan, views, nin, nout, i, end_norm)
                normed = end_norm is not None
            else:
                h = self._mamba(buf, plan, views, state, nin, nout, i)
                normed = False
        nin = None
        if fused and self.final_b is None:
            nin = self._norm_in(buf, n)
        elif not normed:
            self._add_norm(buf, h, token_ids, self.final_w, n, norm_b=self.final_b)
        return self._linear(buf["x"], self.head, buf["logits"], bias=self.head_bias, x_planes=buf["xpl"],
                            x_plane_sums=nin is None, x_word_sums=self._consumer_sums(buf, nin, n),
                            **({"norm_in": nin} if nin is not None else {}))

    def _linear(self, x, weight, out, expert_ready: bool = False, x_planes=None, x_plane_sums: bool = True,
                x_word_sums=None, **kw):
        """``out <- x @ W^T``: the decode kernel where the policy takes it, else the general kernel (split-K into the
        zeroed workspace view ``out``). ``expert_ready``, ``x_planes``, ``x_plane_sums``, ``x_word_sums``: see
        :func:`decode_linear`."""
        if self.policy.takes(weight, x.shape[0], routed=kw.get("row_expert") is not None):
            return self._decode(x, weight, out, expert_ready=expert_ready, x_planes=x_planes,
                                x_plane_sums=x_plane_sums, x_word_sums=x_word_sums, **kw)
        pdl = self._pdl_general
        return routed_matmul(x, weight, out=out, pdl=pdl, early_tile=pdl and self.policy.general_early_tile, **kw)

    @property
    def _pdl_general(self) -> bool:
        """Whether the step's general kernels launch as programmatic dependents (:attr:`DecodePolicy.pdl_general`)."""
        return self.policy.pdl and self.policy.pdl_general

    def _decode(self, x, weight, out, **kw):
        return decode_linear(x, weight, out, policy=self.policy, **kw)

    def _consumer_sums(self, buf, nin: NormIn | None, call: int):
        """The word sums of x's planes for the GEMV after the ``call``-th add + norm (layer ``call``'s first, or the
        head at ``len(layers)``): its NormOut producer's row (None after an add + norm kernel, which writes plane 8
        itself)."""
        return self._sums(buf, "wx", call) if nin is not None else None

    def _mamba(self, buf, plan: _MambaPlan, views, state, nin: NormIn | None = None, nout: NormOut | None = None,
               layer: int = 0):
        xz, dbc, out = views
        di = plan.in_proj.n // 2
        conv_state = state.conv_state[plan.slot]
        conv = (conv_state, plan.conv_w, plan.conv_b)
        rows = xz.shape[0]
        if self.policy.takes(plan.in_proj, rows) and self.policy.takes(plan.x_proj, rows):
            # the conv step in in_proj's epilogue (its output into xc), x_proj on it
            xc = buf["xc"][:, :di]
            self._decode(buf["x"], plan.in_proj, xz, bias=plan.in_bias, conv_out=conv + (xc,), x_planes=buf["xpl"],
                         x_plane_sums=nin is None, norm_in=nin, x_word_sums=self._consumer_sums(buf, nin, layer),
                         conv_ready=self.policy.early_reads)
            self._decode(xc, plan.x_proj, dbc)
        else:  # the conv step's output on its own (the state is shifted by the dt kernel below)
            self._linear(buf["x"], plan.in_proj, xz, bias=plan.in_bias)
            if buf["conv_scratch"] is None or buf["conv_scratch"].shape != conv_state.shape:
                buf["conv_scratch"] = torch.empty_like(conv_state)
            xc = buf["xc"][:, :di]
            causal_conv1d_update_triton(xz[:, :di], conv_state, plan.conv_w, plan.conv_b, "silu",
                                        out_state=buf["conv_scratch"], out=xc, pdl=self._pdl_general)
            self._linear(xc, plan.x_proj, dbc)
        y = buf["y"][:, :di]
        dt_state_update(dbc, plan.dt_w, plan.dt_bias, xz[:, :di], xz[:, di:], plan.A, plan.D,
                        state.ssm_state[plan.slot], y, conv=conv, pdl=self.policy.pdl,
                        inputs_ready=self.policy.early_reads,
                        block_d=self.policy.ssm_block_d if y.shape[0] == 1 else self.policy.ssm_block_d_batched,
                        y_planes=buf["ypl"], y_word_sums=self._sums(buf, "wy", layer))
        return self._linear(y, plan.out_proj, out, bias=plan.out_bias, x_planes=buf["ypl"], x_plane_sums=False,
                            x_word_sums=self._sums(buf, "wy", layer),
                            **({"norm_out": nout} if nout is not None else {}))

    def _moe(self, buf, plan: _MoePlan, views, nin: NormIn | None = None, nout: NormOut | None = None,
             layer: int = 0, end_norm: RowAddNorm | None = None):
        h1, out = views
        ffn = plan.fc1.n // 2 if plan.gated else plan.fc1.n
        act = buf["act"][:, :ffn]
        # gate, up and activation in one kernel
        int8_fc1, int8_fc2 = self._int8_fc1(plan, act.shape[0]), self._int8_fc2(plan, act.shape[0])
        if int8_fc1:  # on int8 codes of x, with dp4a; the expert index read after the wait
            w4a8_rows(*buf["xq"], plan.fc1, out=act, row_expert=buf["idx"], gate=plan.activation,
                      block_n=self.policy.int8_rows_block_n_for(self.policy.int8_rows_block_n, act.shape[0],
                                                                plan.fc1.n),
                      chunk=self.policy.int8_rows_chunk, pdl=self.policy.pdl, expert_ready=False,
                      out_planes=buf["apl"], out_word_sums=self._sums(buf, "wa", layer))
        elif plan.gated and self.policy.takes(plan.fc1, act.shape[0], routed=True):
            route = None
            if nin is not None:  # the route from the accumulated norm (no router kernel ran)
                route = self._route(nin, plan, scale=True)
            self._decode(buf["x"], plan.fc1, act, row_expert=buf["idx"], gated=plan.activation, x_planes=buf["xpl"],
                         out_planes=buf["apl"], x_plane_sums=nin is None, norm_in=route,
                         x_word_sums=self._consumer_sums(buf, nin, layer),
                         out_word_sums=self._sums(buf, "wa", layer) if buf["apl"] is not None else None)
        else:
            self._linear(buf["x"], plan.fc1, h1, row_expert=buf["idx"])
            gated_act(h1, plan.activation, plan.gated, out=act, pdl=self._pdl_general)
        if int8_fc2:  # fc1's output to int8 codes, fc2 on them (the routing weight in its epilogue)
            quantize_rows_int8(act, buf["aq"][0].shape[1], out=buf["aq"], pdl=self.policy.pdl)
        if self.int8_inputs_log is not None and int8_fc1:  # for a twin fed the same values
            # copies of the codes and scales (device to device: a graph's capture records them too)
            self.int8_inputs_log.append(((buf["xq"][0].clone(), buf["xq"][1].clone(), self.d_model),
                                         (buf["aq"][0].clone(), buf["aq"][1].clone(), ffn) if int8_fc2 else None))
        if int8_fc2:
            if nin is not None or nout is not None:
                raise RuntimeError("fused step: an fc2 on int8 codes runs at 2+ rows, with no norm in the GEMVs")
            return w4a8_rows(*buf["aq"], plan.fc2, out=out, row_expert=buf["idx"], row_scale=buf["rwt"],
                             block_n=self.policy.int8_rows_block_n_for(self.policy.int8_rows_fc2_block_n,
                                                                       out.shape[0], plan.fc2.n),
                             chunk=self.policy.int8_rows_fc2_chunk, pdl=self.policy.pdl,
                             expert_ready=self.policy.expert_prefetch, out_norm=end_norm)
        # the router (in the add-norm kernel) ran before fc1: fc2 may read its expert's tile before fc1 is done
        kw = {}
        if nin is not None:
            kw["norm_in"] = self._route(nin, plan, scale=False)
        if nout is not None:
            kw["norm_out"] = nout
        return self._linear(act, plan.fc2, out, row_expert=buf["idx"], row_scale=buf["rwt"],
                            expert_ready=self.policy.expert_prefetch, x_planes=buf["apl"], x_plane_sums=False,
                            x_word_sums=self._sums(buf, "wa", layer), **kw)
