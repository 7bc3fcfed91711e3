"""``load_model``: any supported checkpoint -> a ready-to-run :class:`MambaLM`; ``build_model``: the one model
builder (``load_model`` and the quantizer use it on what :func:`qmamba.checkpoints.detect.open_checkpoint` read).

The model is built on the ``meta`` device and filled with ``load_state_dict(assign=True)``: every tensor is
converted once (to the target device and dtype) while the CPU copy is released, so peak memory stays near one
copy of the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qmamba.devices import check_backend, check_fits, resolve_device
from qmamba.errors import CheckpointError, ConfigError
from qmamba.ops import BACKENDS

from .detect import open_checkpoint
from .files import one_line
from .manifest import checkpoint_int8_activations, dtype_name, parse_dtype
from .shapes import is_quantized_tensor, meta_model, quantized_names

TOKENIZER_FILE = "tokenizer.json"


def default_backend(device: torch.device) -> str:
    """``"triton"`` on CUDA when triton and qmamba's Triton ops import, else ``"reference"``."""
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401

        from qmamba.kernels import triton_ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: use the reference ops
        return "reference"
    return "triton"


def build_model(cfg, state_dict: dict[str, torch.Tensor], manifest: dict, device, dtype: torch.dtype | None, *,
                skeleton=None):
    """A :class:`MambaLM` for ``cfg`` holding ``state_dict`` (consumed) on ``device``; floating non-quantized
    tensors are cast to ``dtype`` (``None``: each keeps its stored dtype), packed tensors of quantized modules keep
    theirs. ``skeleton``: the float model of ``cfg`` on ``meta`` to fill (a :class:`Checkpoint`'s; consumed), else
    one is built."""
    quantization = manifest.get("quantization") or None
    model = skeleton if skeleton is not None else meta_model(cfg)
    if quantization:
        from qmamba.quant.modules import swap_quantized_modules

        swap_quantized_modules(model, quantization)
    skip = quantized_names(quantization)
    tensors = {}
    for name in list(state_dict):
        t = state_dict.pop(name)
        if dtype is not None and t.is_floating_point() and not is_quantized_tensor(name, skip):
            t = t.to(device=device, dtype=dtype)
        else:
            t = t.to(device=device)
        tensors[name] = t
    head_is_tied = cfg.tie_embeddings and not is_quantized_tensor("lm_head.weight", skip)
    if head_is_tied:
        tensors["lm_head.weight"] = tensors["embedding.weight"]
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not fit the model: {one_line(exc, 400)}") from None
    if head_is_tied:
        model.lm_head.weight = model.embedding.weight
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(f"checkpoint leaves tensors unset: {on_meta[:4]}")
    model.eval()
    model.requires_grad_(False)
    return model


def model_from_checkpoint(checkpoint, device, dtype: torch.dtype | None):
    """:func:`build_model` on an :func:`open_checkpoint` result (its tensors and skeleton are consumed)."""
    model = build_model(checkpoint.config, checkpoint.state_dict, checkpoint.manifest, device, dtype,
                        skeleton=checkpoint.skeleton)
    checkpoint.state_dict, checkpoint.skeleton = {}, None
    return model


def loaded_bytes(state_dict: dict[str, torch.Tensor], manifest: dict, dtype: torch.dtype) -> int:
    """Bytes the state dict takes once loaded: floating non-quantized tensors in ``dtype``, packed ones as stored."""
    skip = quantized_names(manifest.get("quantization") or None)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * (itemsize if t.is_floating_point() and not is_quantized_tensor(name, skip)
                            else t.element_size()) for name, t in state_dict.items())


def load_model(path, device=None, dtype=None, backend=None, *, hash_files: bool = False,
               dense_cache: bool | None = None, cpu_int4: bool = False, int8_activations: bool | None = None):
    """Load a checkpoint of any supported format (local dir, file inside it, or hub id) as a :class:`MambaLM`.

    ``device``: default CPU. ``dtype``: default float32 on CPU, bfloat16 on CUDA (names like "bf16" work).
    ``backend``: "reference" or "triton"; default triton on CUDA when available. The model gets
    ``model.tokenizer_path`` (``tokenizer.json`` beside the weights, or ``None``) and ``model.checkpoint_manifest``.
    ``hash_files``: record sha256 of source-format files in the manifest (off by default: it re-reads the files).
    ``dense_cache``: quantized modules keep their reference operands (dense weights) in ``dtype`` instead of
    unpacking them on every call (:func:`qmamba.quant.modules.keep_dense_weights`); default: on with the reference
    backend (CPU), where it makes a quantized model as fast as the float one, at the cost of a float copy of the
    quantized weights in memory (``model.dense_cache_bytes``; 4 bytes per weight in float32, 2 in bfloat16).
    ``cpu_int4``: with the dense cache on CPU, int4 linears (group size 32-256) keep torch's packed int4 layout
    instead and run its CPU int4 matmul (``qmamba generate`` on CPU does this): a few times faster decode and
    ~0.56 bytes per weight instead of 4, but activations are rounded to bfloat16, so the logits are not bit-exact
    with the reference path (``model.cpu_int4_modules`` lists the modules). Experts keep the dense cache.
    On CUDA with the Triton backend, int4 weights of group size 128 / 256 are held as plane words
    (:func:`qmamba.quant.modules.use_plane_words`: the layout the kernels read; the state dict is unchanged).
    ``int8_activations``: prefills run the MoE's int4 experts on int8 activations (W4A8: ``model.int8_activations``;
    CUDA kernels, a faster prefill with slightly different numbers); default: what ``qmamba quantize`` decided from
    its check on the calibration text (:func:`checkpoint_int8_activations`), else off.
    """
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    check_backend(backend, device)
    checkpoint = open_checkpoint(path, hash_files=hash_files)
    cfg, manifest = checkpoint.config, checkpoint.manifest
    quantized = bool(manifest.get("quantization"))
    dense_cache = (backend == "reference") if dense_cache is None else dense_cache
    needed = loaded_bytes(checkpoint.state_dict, manifest, dtype)
    if quantized and dense_cache:  # upper bound of the dense copies: every parameter in dtype
        needed += cfg.parameter_counts()["total"] * torch.empty(0, dtype=dtype).element_size()
    check_fits(needed, device, f"the model ({dtype_name(dtype)} weights)")
    model = model_from_checkpoint(checkpoint, device, dtype)
    model.set_backend(backend)
    if quantized and backend == "triton" and device.type == "cuda":  # int4 codes in the layout the kernels read
        from qmamba.quant.modules import use_plane_words

        use_plane_words(model)
    model.dense_cache_bytes, model.cpu_int4_modules = 0, []
    if quantized and dense_cache:
        from qmamba.quant.modules import cpu_int4_module_names, keep_dense_weights

        model.dense_cache_bytes = keep_dense_weights(model, dtype, cpu_int4=cpu_int4 and device.type == "cpu")
        model.cpu_int4_modules = cpu_int4_module_names(model)
    tokenizer = Path(checkpoint.directory) / TOKENIZER_FILE
    model.tokenizer_path = tokenizer if tokenizer.is_file() else None
    model.checkpoint_manifest = checkpoint.manifest
    model.int8_activations = (checkpoint_int8_activations(checkpoint.manifest) if int8_activations is None
                              else bool(int8_activations))
    return model
