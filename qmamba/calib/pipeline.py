"""Layer-by-layer calibration: capture each planned linear's inputs with the already-quantized preceding layers,
quantize it (RTN / GPTQ / AWQ / PTB, see the registry :mod:`qmamba.calib.methods`), replace its weight by the
dequantized one, move on.

Only the current block is on the compute device: the model stays where it is (the CPU, in the checkpoint's dtype)
and each block is moved there in float32 for its turn, then moved back with its own dtypes (so quantizing
BlackMamba-2.8B on a GPU holds one block, the calibration activations and one Hessian there, not the model). A
progress bar per block shows the ETA. Without calibration ids (``calibrate(model, None, plan)``: RTN and 1-bit
PTB, which need no data) each weight is quantized from its own values, block by block, and no SQNR is measured.

The walk mirrors ``MambaLM.prefill`` (fp32 residual stream, ``x = norm(residual)``, ``h = mixer(x)``) over the
calibration sequences in chunks. Inside a Mamba block the planned projections are taken in forward order
(in_proj, x_proj, dt_proj, out_proj): a forward pre-hook on the projection records its input and stops the mixer
right there. Inside an MoE block every token is routed by the (float) router and each expert sees only its tokens.

MoE-aware rules:
* an expert with fewer than ``min_expert_tokens`` routed tokens uses the statistics of *all* the layer's tokens
  (fallback ``"all-tokens"``); if its quantization still fails (non-finite statistics, GPTQ Cholesky failure) it
  is rounded to nearest (fallback ``"rtn"``). Both are logged and reported; results are checked to be finite.
* all experts of one linear are captured first (fc1 of every expert, then fc2 on the quantized fc1s' outputs),
  then quantized: GPTQ solves the 8 (or E) experts in one batched column loop (``Method.solve_stack``), with the
  per-expert results of solving each alone.
* AWQ: the fc1 input scale is shared by all experts (it is folded into the block's RMSNorm weight, and the router
  weight columns are multiplied by it so routing is unchanged); the fc2 input scale is per expert and folded into
  the ``b`` half of that expert's fc1 rows (gated experts only; ungated: clipping only).
* AWQ on Mamba: in_proj's scale is folded into the block's RMSNorm weight (exact). out_proj (input = gated scan
  output), x_proj (input = conv + SiLU output) and dt_proj get the clipping search only: no exact fold exists and
  the runtime has no input-scale vector. No Hadamard rotation is applied. lm_head: folded into the final norm's
  weight and bias (the embedding keeps its float weights, so this is exact even with tied embeddings).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qmamba.block_plan import EXPERT_STACKS, MAMBA_LINEARS
from qmamba.moe import activation_fn
from qmamba.quant.formats import WeightFormat

from qmamba.calib.awq import search_scale
from qmamba.calib.gptq import HessianAccumulator
from qmamba.calib.methods import METHODS, data_free_method
from qmamba.calib.recipe import PlanEntry
from qmamba.calib.route_fit import refit_router

log = logging.getLogger("qmamba.calib")


@dataclass
class CalibOptions:
    batch_size: int = 8               # sequences per forward chunk
    act_order: bool = False           # GPTQ act-order (static groups)
    block_size: int = 128             # GPTQ lazy block
    damp: float = 0.01                # GPTQ damping, fraction of mean(diag H)
    awq_grid: int = 20                # AWQ alphas / clip ratios
    min_expert_tokens: int = 64       # below: expert statistics from all the layer's tokens
    max_stored_tokens: int = 4096     # token subsample kept for AWQ search and SQNR
    hessian_dtype: str | None = None  # GPTQ Hessian accumulation: float64 on CPU, float32 on CUDA by default
    refit_routers: bool = False       # MoE: refit each router to the float logits (qmamba.calib.route_fit)
    refit_ridge: float = 1e-3         # its ridge toward the float router, relative to mean diag(X^T X)
    progress: bool = True


@dataclass
class ModuleResult:
    """Outcome for one planned module (experts: all experts of one fc1/fc2)."""

    name: str
    kind: str
    fmt: WeightFormat
    method: str
    packed: dict
    n_params: int
    signal: float = 0.0               # sum (x W^T)^2 on stored tokens
    noise: float = 0.0                # sum (x W^T - x W_hat^T)^2
    fallbacks: dict = field(default_factory=dict)   # expert -> "all-tokens" | "rtn"
    expert_tokens: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def sqnr_db(self) -> float:
        return 10 * math.log10(self.signal / self.noise) if self.noise > 0 else float("inf")

    def manifest_entry(self) -> dict:
        entry = {**self.fmt.to_dict(), "method": self.method}
        if self.fallbacks:
            entry["fallback"] = {str(e): f for e, f in sorted(self.fallbacks.items())}
        return entry


class _StopForward(Exception):
    pass


def hessian_dtype(opts: CalibOptions, device) -> torch.dtype:
    if opts.hessian_dtype is not None:
        return getattr(torch, opts.hessian_dtype)
    return torch.float32 if torch.device(device).type == "cuda" else torch.float64


class _InputCapture:
    """Statistics of one linear's inputs ``x [..., K]``: Hessian (GPTQ), mean |x| (AWQ) and a token subsample."""

    def __init__(self, k: int, want_hessian: bool, stride: int, device, h_dtype: torch.dtype = torch.float64):
        self.hessian = HessianAccumulator(k, device, h_dtype) if want_hessian else None
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.stride = max(1, stride)
        self.stored: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.hessian is not None:
            self.hessian.add(x)
        self.abs_sum += x.abs().sum(0).double()
        self.n_tokens += x.shape[0]
        self.stored.append(x[:: self.stride].clone())

    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.stored) if self.stored else torch.zeros(0, self.abs_sum.numel())


def _stride_for(n_tokens: int, max_stored: int) -> int:
    return max(1, math.ceil(n_tokens / max(1, max_stored)))


# ---- one weight matrix -------------------------------------------------------------------------------------
def quantize_matrix(W: torch.Tensor, fmt: WeightFormat, method: str, cap: _InputCapture | None,
                    opts: CalibOptions, x_used: torch.Tensor | None = None):
    """Codes and params ``(q, scale, zero, how)`` of ``W [N, K]``; ``how`` is the method actually used (the
    format's data-free one when ``method`` cannot run, see :mod:`qmamba.calib.methods`)."""
    solve = METHODS[method].solve
    return solved_or_data_free(W, fmt, method, solve(W, fmt, cap, opts, x_used) if solve is not None else None)


def solved_or_data_free(W: torch.Tensor, fmt: WeightFormat, method: str, solved: tuple | None):
    """``(*solved, method)``, or the format's data-free codes of ``W`` and that method's name when ``solved`` is
    ``None`` (the method could not run)."""
    if solved is not None:
        return (*solved, method)
    s, z = fmt.params(W)
    return fmt.quantize(W, s, z), s, z, data_free_method(fmt)


def _accumulate_error(result: ModuleResult, x: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> None:
    if x.shape[0] == 0:
        return
    ref = x @ W.T
    result.signal += float(ref.pow(2).sum())
    result.noise += float((ref - x @ W_hat.T).pow(2).sum())


# ---- moving one block at a time ------------------------------------------------------------------------------
def move_module(module: nn.Module, device, float_dtype: torch.dtype | None = None,
                dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.dtype]:
    """Move ``module``'s parameters and buffers to ``device`` in place (the Parameter objects are kept, so tied
    weights stay tied). Floating parameters become ``float_dtype`` when given, or their entry in ``dtypes`` (a
    result of an earlier call) when present; buffers (packed quantized tensors) keep their dtype. Returns the
    parameters' dtypes before the move."""
    before = {}
    for prefix, mod in module.named_modules():
        for key, p in mod._parameters.items():
            if p is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            before[name] = p.dtype
            dtype = p.dtype
            if p.is_floating_point():
                dtype = (dtypes or {}).get(name, float_dtype or p.dtype)
            p.data = p.data.to(device=device, dtype=dtype)
        for key, b in mod._buffers.items():
            if b is not None:
                mod._buffers[key] = b.to(device)
    return before


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors are: its first parameter's device, else its first buffer's (a quantized linear
    holds buffers only)."""
    return next(iter([*module.parameters(), *module.buffers()])).device


@torch.no_grad()
def _router_walk(model: nn.Module, ids: torch.Tensor, record, device, batch_size: int, progress: bool,
                 desc: str) -> dict[int, torch.Tensor]:
    """Walk ``model`` one block at a time on ``device`` in float32 up to its last MoE layer (the model stays where
    it is) and collect ``record(mixer, x [T, d])`` at every MoE layer: ``{layer: cat of the records}`` (CPU)."""
    dev = torch.device(device) if device is not None else ids.device
    home = model.embedding.weight.device
    last_moe = max(model.config.moe_layer_ids, default=-1)
    chunks = list(ids.split(batch_size))
    residual = [torch.zeros(*c.shape, model.config.d_model, device=dev) for c in chunks]
    h = [model.embedding(c.to(home)).float().to(dev) for c in chunks]
    records: dict[int, list] = {}
    for block in tqdm(model.blocks[: last_moe + 1], desc=desc, unit="block", disable=not progress,
                      dynamic_ncols=True):
        block_home = module_device(block.module)
        dtypes = move_module(block.module, dev, torch.float32)
        residual = [r + hh for r, hh in zip(residual, h)]
        h = []
        for r in residual:
            x = block.norm(r, out_dtype=torch.float32)
            if block.is_mamba:
                h.append(block.mixer(x)[0])
            else:
                records.setdefault(block.index, []).append(record(block.mixer, x.reshape(-1, x.shape[-1])).cpu())
                h.append(block.mixer(x))
        move_module(block.module, block_home, dtypes=dtypes)
    return {i: torch.cat(v) for i, v in records.items()}


def record_routing_blockwise(model: nn.Module, ids: torch.Tensor, device=None, batch_size: int = 8,
                             progress: bool = False, desc: str = "routing") -> dict[int, torch.Tensor]:
    """Top-1 expert of every token at every MoE layer, ``{layer: idx [N * L] int16}`` as
    :func:`qmamba.eval.record_routing` gives (the block's own decision), but walking the model one block at a time
    on ``device`` in float32: the router-agreement report of a model that does not fit on the device."""
    return _router_walk(model, ids, lambda mixer, x: mixer.route(x)[0].to(torch.int16), device, batch_size,
                        progress, desc)


def float_router_logits(model: nn.Module, ids: torch.Tensor, device=None, batch_size: int = 8,
                        progress: bool = False) -> dict[int, torch.Tensor]:
    """Router logits ``{MoE layer: [N * L, E] float32 (CPU)}`` of the (float) ``model`` on ``ids [N, L]``, by the
    same block-wise walk as :func:`record_routing_blockwise`."""
    return _router_walk(model, ids, lambda mixer, x: mixer.router(x).float(), device, batch_size, progress,
                        "router refit: float logits")


# ---- the walk ----------------------------------------------------------------------------------------------
class Calibrator:
    """Runs the walk over ``model`` (modified in place: weights become their dequantized values). ``device``: where
    the work runs (default: that of the ids, else the model's); blocks go there one at a time in float32."""

    def __init__(self, model: nn.Module, plan: dict[str, PlanEntry], opts: CalibOptions, device=None,
                 router_targets: dict[int, torch.Tensor] | None = None):
        self.model, self.plan, self.opts = model, plan, opts
        self.device = torch.device(device) if device is not None else None
        self.results: dict[str, ModuleResult] = {}
        self.router_targets = router_targets  # {MoE layer: float logits [N * L, E]}: refit the routers
        self.router_fits: dict[int, dict] = {}

    def _layer_bar(self, desc: str):
        return tqdm(self.model.blocks, desc=desc, unit="block", disable=not self.opts.progress,
                    dynamic_ncols=True)

    # chunks of the residual stream: lists of tensors [b, L, d]
    def run(self, ids: torch.Tensor | None) -> dict[str, ModuleResult]:
        model, opts = self.model, self.opts
        model.eval()
        if ids is None:
            return self._run_data_free()
        dev = self.device or ids.device
        home = model.embedding.weight.device
        chunks = list(ids.split(opts.batch_size))
        with torch.no_grad():
            residual = [torch.zeros(*c.shape, model.config.d_model, device=dev) for c in chunks]
            h = [model.embedding(c.to(home)).float().to(dev) for c in chunks]
            layer_bar = self._layer_bar("calibrating")
            for block in layer_bar:
                layer_bar.set_postfix_str(f"{block.index}:{block.kind}")
                block_home = module_device(block.module)
                dtypes = move_module(block.module, dev, torch.float32)
                residual = [r + hh for r, hh in zip(residual, h)]
                if block.is_mamba:
                    self._mamba_block(block, residual)
                else:
                    self._moe_block(block, residual)
                h = [block.mixer(block.norm(r, out_dtype=torch.float32))[0] if block.is_mamba
                     else block.mixer(block.norm(r, out_dtype=torch.float32)) for r in residual]
                move_module(block.module, block_home, dtypes=dtypes)
            if "lm_head" in self.plan:
                residual = [r + hh for r, hh in zip(residual, h)]
                with self._head_on(dev):
                    self._head(residual)
        return self.results

    def _run_data_free(self) -> dict[str, ModuleResult]:
        """RTN / PTB: every planned weight quantized from its own values, one block at a time on the device."""
        model = self.model
        dev = self.device or model.embedding.weight.device
        with torch.no_grad():
            for block in self._layer_bar("quantizing"):
                block_home = module_device(block.module)
                dtypes = move_module(block.module, dev, torch.float32)
                if block.is_mamba:
                    for leaf in MAMBA_LINEARS:
                        name = f"{block.mixer_name}.{leaf}"
                        if name in self.plan:
                            self._quantize_linear_data_free(name, leaf, getattr(block.mixer, leaf))
                else:
                    self._experts_data_free(block, block.mixer.experts)
                move_module(block.module, block_home, dtypes=dtypes)
            if "lm_head" in self.plan:
                with self._head_on(dev):
                    self._head(None)
        return self.results

    def _quantize_linear_data_free(self, name: str, kind: str, linear: nn.Linear) -> None:
        entry = self.plan[name]
        W = linear.weight.detach().float()
        result = ModuleResult(name, kind, entry.fmt, entry.method, {}, W.numel())
        q, s, z, how = quantize_matrix(W, entry.fmt, entry.method, None, self.opts)
        if how != entry.method:
            result.fallbacks["-"] = how
        W_hat = entry.fmt.dequantize_codes(q, s, z)
        self._check_finite(name, W_hat)
        result.packed = entry.fmt.from_codes(q, s, z)
        linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
        self.results[name] = result

    def _experts_data_free(self, block, experts) -> None:
        for which in EXPERT_STACKS:
            name = f"{block.mixer_name}.experts.{which}"
            entry = self.plan.get(name)
            if entry is None:
                continue
            weights = getattr(experts, which)
            result = ModuleResult(name, f"experts.{which}", entry.fmt, entry.method, {}, weights.numel())
            codes, scales, zeros = [], [], []
            for e in range(experts.n_experts):
                W = weights[e].detach().float()
                q, s, z, how = quantize_matrix(W, entry.fmt, entry.method, None, self.opts)
                if how != entry.method:
                    result.fallbacks[e] = how
                W_hat = entry.fmt.dequantize_codes(q, s, z)
                self._check_finite(f"{name}[{e}]", W_hat)
                weights.data[e] = W_hat.to(weights.dtype)
                codes.append(q), scales.append(s), zeros.append(z)
            result.packed = entry.fmt.from_codes(torch.stack(codes), torch.stack(scales),
                                                 None if zeros[0] is None else torch.stack(zeros))
            self.results[name] = result

    @contextlib.contextmanager
    def _head_on(self, dev):
        """The final norm and the head (with a tied embedding) on ``dev`` in float32 for the head's turn; back
        afterwards (a head untied by :meth:`_head` goes back in the dtype the head had)."""
        model = self.model
        home = module_device(model.lm_head)
        head_dtype = model.lm_head.weight.dtype
        norm_dtypes = move_module(model.norm_f, dev, torch.float32)
        head_dtypes = move_module(model.lm_head, dev, torch.float32)
        try:
            yield
        finally:
            move_module(model.norm_f, home, dtypes=norm_dtypes)
            if model.lm_head.weight is not model.embedding.weight and model.config.tie_embeddings:
                move_module(model.embedding, home, dtypes={"weight": head_dtype})  # the untied embedding
                move_module(model.lm_head, home, head_dtype)
            else:
                move_module(model.lm_head, home, dtypes=head_dtypes)

    # ---- Mamba -------------------------------------------------------------------------------------------
    def _capture(self, module: nn.Linear, run_chunk, n_chunks: int, want_hessian: bool, n_tokens: int):
        cap = _InputCapture(module.in_features, want_hessian, _stride_for(n_tokens, self.opts.max_stored_tokens),
                            module.weight.device, hessian_dtype(self.opts, module.weight.device))

        def hook(_mod, args):
            cap.add(args[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(hook)
        try:
            for j in range(n_chunks):
                try:
                    run_chunk(j)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return cap

    def _mamba_block(self, block, residual) -> None:
        mixer = block.mixer
        n_tokens = sum(r.shape[0] * r.shape[1] for r in residual)
        for leaf in MAMBA_LINEARS:
            name = f"{block.mixer_name}.{leaf}"
            if name not in self.plan:
                continue
            entry = self.plan[name]
            linear = getattr(mixer, leaf)
            cap = self._capture(linear, lambda j: mixer(block.norm(residual[j], out_dtype=torch.float32)),
                                len(residual), METHODS[entry.method].needs_hessian, n_tokens)
            W = linear.weight.detach().float()
            x_used = cap.tokens()
            result = ModuleResult(name, leaf, entry.fmt, entry.method, {}, W.numel())
            if METHODS[entry.method].searches_scales:
                if leaf == "in_proj":  # fold 1/s into the block's RMSNorm weight: exact
                    s, alpha, _ = search_scale([(W, x_used)], cap.x_mean(), entry.fmt, self.opts.awq_grid)
                    block.norm.weight.data.div_(s.to(block.norm.weight.dtype))
                    W, x_used = W * s, x_used / s
                    result.notes.append(f"awq alpha={alpha:.2f} folded into norm")
                else:
                    result.notes.append("awq: clipping only (no exact fold)")
            q, s, z, how = quantize_matrix(W, entry.fmt, entry.method, cap, self.opts, x_used)
            if how != entry.method:
                result.fallbacks["-"] = how
            W_hat = entry.fmt.dequantize_codes(q, s, z)
            self._check_finite(name, W_hat)
            _accumulate_error(result, x_used, W, W_hat)
            result.packed = entry.fmt.from_codes(q, s, z)
            linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
            self.results[name] = result

    # ---- MoE ---------------------------------------------------------------------------------------------
    def _moe_block(self, block, residual) -> None:
        mixer, opts = block.mixer, self.opts
        experts = mixer.experts
        x_all = torch.cat([block.norm(r, out_dtype=torch.float32).reshape(-1, r.shape[-1]) for r in residual])
        if self.router_targets is not None and block.index in self.router_targets:
            self.router_fits[block.index] = refit_router(mixer.router, x_all, self.router_targets[block.index],
                                                         opts.refit_ridge)
        idx = mixer.router(x_all).argmax(-1)  # sigmoid is monotonic: argmax of logits = top-1 expert
        n_exp = experts.n_experts
        token_sets = [(idx == e).nonzero(as_tuple=True)[0] for e in range(n_exp)]
        counts = [int(t.numel()) for t in token_sets]
        uses_all = [c < opts.min_expert_tokens for c in counts]
        for e in range(n_exp):
            if uses_all[e]:
                log.warning("layer %d expert %d: %d routed calibration tokens (< %d): statistics from all %d tokens",
                            block.index, e, counts[e], opts.min_expert_tokens, x_all.shape[0])
        x_e = [x_all if uses_all[e] else x_all[token_sets[e]] for e in range(n_exp)]
        name1, name2 = (f"{block.mixer_name}.experts.{which}" for which in EXPERT_STACKS)
        e1, e2 = self.plan.get(name1), self.plan.get(name2)
        act = activation_fn(experts.activation)
        ffn = experts.fc2.shape[2]

        def stride(n):
            return _stride_for(n, opts.max_stored_tokens)

        r1 = ModuleResult(name1, "experts.fc1", e1.fmt, e1.method, {}, experts.fc1.numel()) if e1 else None
        r2 = ModuleResult(name2, "experts.fc2", e2.fmt, e2.method, {}, experts.fc2.numel()) if e2 else None
        # AWQ scales first, on the float weights (folds are exact there)
        if e1 is not None and METHODS[e1.method].searches_scales:
            pairs = [(experts.fc1[e].detach().float(), x_e[e][:: stride(x_e[e].shape[0])]) for e in range(n_exp)]
            x_mean = x_all.abs().mean(0)
            s, alpha, _ = search_scale(pairs, x_mean, e1.fmt, opts.awq_grid)
            block.norm.weight.data.div_(s.to(block.norm.weight.dtype))
            mixer.router.weight.data.mul_(s.to(mixer.router.weight.dtype))
            experts.fc1.data.mul_(s.to(experts.fc1.dtype))
            x_all = x_all / s
            x_e = [x / s for x in x_e]
            r1.notes.append(f"awq alpha={alpha:.2f} shared, folded into norm (+ router columns)")
        if e2 is not None and METHODS[e2.method].searches_scales and experts.gated:
            alphas = []
            for e in range(n_exp):
                a, b = (x_e[e] @ experts.fc1[e].float().T).chunk(2, dim=-1)
                x2 = act(a) * b
                W2 = experts.fc2[e].detach().float()
                s, alpha, _ = search_scale([(W2, x2[:: stride(x2.shape[0])])], x2.abs().mean(0), e2.fmt,
                                           opts.awq_grid)
                experts.fc1.data[e, ffn:] /= s[:, None].to(experts.fc1.dtype)
                experts.fc2.data[e] *= s[None, :].to(experts.fc2.dtype)
                alphas.append(alpha)
            r2.notes.append("awq alphas " + ",".join(f"{a:.2f}" for a in alphas) + " folded into fc1 b rows")
        elif e2 is not None and METHODS[e2.method].searches_scales:
            r2.notes.append("awq: clipping only (ungated experts: no exact fold)")

        def expert_input(e: int, which: str) -> torch.Tensor:
            if which == "fc1":
                return x_e[e]
            a = x_e[e] @ experts.fc1[e].float().T
            if experts.gated:
                a, b = a.chunk(2, dim=-1)
                return act(a) * b
            return act(a)

        # fc1 (all experts), then fc2 on the quantized fc1's outputs; a method with solve_stack (GPTQ) solves each
        # linear's experts at once, from every expert's capture
        bar = tqdm(total=n_exp * ((e1 is not None) + (e2 is not None)), desc=f"layer {block.index} experts",
                   disable=not opts.progress, leave=False)
        for name, entry, result, which in ((name1, e1, r1, "fc1"), (name2, e2, r2, "fc2")):
            if entry is None:
                continue
            weights = getattr(experts, which)
            method = METHODS[entry.method]
            caps, error_tokens = [], []
            for e in range(n_exp):
                x_in = expert_input(e, which)
                cap = _InputCapture(x_in.shape[-1], method.needs_hessian, stride(x_in.shape[0]), x_in.device,
                                    hessian_dtype(opts, x_in.device))
                cap.add(x_in)
                own = x_in if not uses_all[e] or counts[e] == 0 else x_in[token_sets[e]]
                caps.append(cap)
                error_tokens.append(own[:: stride(own.shape[0])].clone())  # not a view: x_in is freed
            stacked = None
            if method.solve_stack is not None:
                stacked = method.solve_stack(weights.detach().float(), entry.fmt, caps, opts)
            codes, scales, zeros = [], [], []
            for e in range(n_exp):
                W = weights[e].detach().float()
                if stacked is not None:
                    q, s, z, how = solved_or_data_free(W, entry.fmt, entry.method, stacked[e])
                else:
                    q, s, z, how = quantize_matrix(W, entry.fmt, entry.method, caps[e], opts, caps[e].tokens())
                caps[e] = None
                if how != entry.method:
                    result.fallbacks[e] = how
                elif uses_all[e]:
                    result.fallbacks[e] = "all-tokens"
                W_hat = entry.fmt.dequantize_codes(q, s, z)
                self._check_finite(f"{name}[{e}]", W_hat)
                _accumulate_error(result, error_tokens[e], W, W_hat)
                weights.data[e] = W_hat.to(weights.dtype)
                codes.append(q), scales.append(s), zeros.append(z)
                bar.update(1)
            result.expert_tokens = counts
            result.packed = entry.fmt.from_codes(torch.stack(codes), torch.stack(scales),
                                                 None if zeros[0] is None else torch.stack(zeros))
            self.results[name] = result
        bar.close()

    # ---- head --------------------------------------------------------------------------------------------
    def _head(self, residual) -> None:
        """Quantize the head on the final-norm outputs of ``residual`` (``None``: data-free)."""
        model, entry = self.model, self.plan["lm_head"]
        head = model.lm_head
        cap = None
        if residual is not None:
            n_tokens = sum(r.shape[0] * r.shape[1] for r in residual)
            stride = _stride_for(n_tokens, self.opts.max_stored_tokens)
            cap = _InputCapture(head.in_features, METHODS[entry.method].needs_hessian, stride, head.weight.device,
                                hessian_dtype(self.opts, head.weight.device))
            for r in residual:
                cap.add(model.norm_f(r, out_dtype=torch.float32))
        W = head.weight.detach().float()
        result = ModuleResult("lm_head", "lm_head", entry.fmt, entry.method, {}, W.numel())
        x_used = cap.tokens() if cap is not None else None
        if METHODS[entry.method].searches_scales:  # the final norm feeds only the head: fold 1/s into it (and bias)
            s, alpha, _ = search_scale([(W, x_used)], cap.x_mean(), entry.fmt, self.opts.awq_grid)
            model.norm_f.weight.data.div_(s.to(model.norm_f.weight.dtype))
            if getattr(model.norm_f, "bias", None) is not None:
                model.norm_f.bias.data.div_(s.to(model.norm_f.bias.dtype))
            W, x_used = W * s, x_used / s
            result.notes.append(f"awq alpha={alpha:.2f} folded into the final norm")
        q, s, z, how = quantize_matrix(W, entry.fmt, entry.method, cap, self.opts, x_used)
        if how != entry.method:
            result.fallbacks["-"] = how
        W_hat = entry.fmt.dequantize_codes(q, s, z)
        self._check_finite("lm_head", W_hat)
        if x_used is not None:
            _accumulate_error(result, x_used, W, W_hat)
        result.packed = entry.fmt.from_codes(q, s, z)
        if model.config.tie_embeddings:  # untie: the embedding keeps the float weights
            model.lm_head = nn.Linear(head.in_features, head.out_features, bias=False).to(W.device)
        model.lm_head.weight.data.copy_(W_hat)
        self.results["lm_head"] = result

    @staticmethod
    def _check_finite(name: str, W_hat: torch.Tensor) -> None:
        if not torch.isfinite(W_hat).all():
            raise RuntimeError(f"quantization of {name} produced non-finite weights")


def calibrate(model: nn.Module, ids: torch.Tensor | None, plan: dict[str, PlanEntry],
              opts: CalibOptions | None = None, device=None, router_fits: dict | None = None
              ) -> dict[str, ModuleResult]:
    """Quantize ``model`` in place (fake-quantized float weights) and return the per-module results (packed).

    ``ids [N, L]``: calibration sequences, or ``None`` for a data-free plan (RTN / PTB only). ``device``: where the
    work runs, one block at a time (default: the ids' device, else the model's); the model stays where it is.
    ``opts.refit_routers`` (MoE models, needs ids): the routers are refitted to the float model's logits (see
    :mod:`qmamba.calib.route_fit`); ``router_fits``, when given, receives ``{layer: {"before", "after"}}`` (in-sample
    top-1 agreement of each router with the float one before and after its refit)."""
    opts = opts or CalibOptions()
    unknown = sorted(set(plan) - set(_planned_names(model)))
    if unknown:
        raise ValueError(f"plan names modules this model lacks: {unknown}")
    if ids is None and plan_needs_data(plan):
        raise ValueError("GPTQ and AWQ need calibration ids")
    if ids is None and opts.refit_routers:
        raise ValueError("router refit needs calibration ids")
    targets = None
    if opts.refit_routers and model.config.moe_layer_ids:
        dev = device if device is not None else ids.device
        targets = float_router_logits(model, ids, dev, opts.batch_size, opts.progress)
    calibrator = Calibrator(model, plan, opts, device, targets)
    results = calibrator.run(ids)
    if router_fits is not None:
        router_fits.update(calibrator.router_fits)
    return results


def plan_needs_data(plan: dict[str, PlanEntry]) -> bool:
    """Whether any planned module is quantized by a method that needs calibration data (GPTQ, AWQ)."""
    return any(METHODS[entry.method].needs_data for entry in plan.values())


def _planned_names(model) -> list[str]:
    from qmamba.calib.recipe import quantizable_modules

    return list(quantizable_modules(model))
