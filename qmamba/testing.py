"""Helpers shared by the kernel tests, scripts/gpu_check.sh and benchmarks/: a randomly initialised model with
sane scales, an RTN swap of every projection (and the experts, and optionally the head) to a packed format, and a
count of the bytes autograd keeps for the backward pass (:class:`SavedTensorBytes`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qmamba.config import ModelConfig
from qmamba.model import MambaLM
from qmamba.quant.modules import swap_quantized_modules


@torch.no_grad()
def random_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> MambaLM:
    """A :class:`MambaLM` with random weights of realistic magnitude (no training), built directly on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = MambaLM(cfg)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, device=p.device, dtype=torch.float32)).expand_as(p))
        elif name.endswith("dt_bias"):
            p.uniform_(-4.0, -2.0)
        elif name.endswith(".D") or "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif p.dim() >= 2:
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        else:
            p.normal_(0.0, 0.02)
    return model.to(dtype)


@torch.no_grad()
def quantize_rtn(model: MambaLM, fmt, head: bool = True, sensitive_fmt=None, float_xdt: bool = False) -> MambaLM:
    """Swap every Mamba projection, every expert stack and (``head=True``) the LM head for RTN-quantized twins in
    ``fmt`` (the embedding stays float). ``sensitive_fmt`` (e.g. int4 beside a 1-bit ``fmt``, Bi-Mamba's split)
    takes x_proj, dt_proj and the head instead; ``float_xdt`` keeps x_proj and dt_proj float (as ``qmamba quantize``
    does by default). Routers, norms and the SSM parameters stay float."""
    small = sensitive_fmt or fmt
    formats = {}
    for block in model.blocks:
        if block.is_mamba:
            formats.update({f"{block.mixer_name}.{leaf}": fmt for leaf in ("in_proj", "out_proj")})
            if not float_xdt:
                formats.update({f"{block.mixer_name}.{leaf}": small for leaf in ("x_proj", "dt_proj")})
        else:
            formats.update({name: fmt for name in block.quantizable_modules()})
    if head:
        formats["lm_head"] = small  # a tied head is untied: the twin holds its own packed copy
    return swap_quantized_modules(model, formats, rtn=True)


def assert_prefill_and_step_match(model: MambaLM, ref_model: MambaLM, ids: torch.Tensor):
    """``model``'s prefill over ``ids`` (logits, SSM state) and one greedy step after it equal ``ref_model``'s (the
    same weights on the reference backend) to kernel tolerances; returns the reference prefill logits."""
    logits, state = model.prefill(ids)
    ref_logits, ref_state = ref_model.prefill(ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-4, rtol=1e-4)
    tok = ref_logits[:, -1].argmax(-1)
    torch.testing.assert_close(model.step(tok, state), ref_model.step(tok, ref_state), atol=1e-3, rtol=1e-3)
    return ref_logits


def train_byte_bpe(path, texts, vocab_size: int = 300) -> None:
    """A small byte-level BPE tokenizer trained on ``texts`` and saved to ``path`` (tests' stand-in tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


class SavedTensorBytes:
    """``with SavedTensorBytes(exclude) as saved: ...`` counts the memory autograd keeps for the backward pass of
    what runs inside: every storage packed by ``torch.autograd.graph.saved_tensors_hooks`` once (views of one
    storage count once), except the storages of the ``exclude`` tensors (model weights: alive anyway).
    ``saved.nbytes`` is the total. Deterministic on any device. Inside a ``torch.utils.checkpoint`` region the
    checkpoint's own hook takes over, so only what the checkpoint keeps (its inputs) is counted: what stays alive."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # kept alive by the graph (returned as is): addresses stay distinct
        if storage.data_ptr() not in self._excluded:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
