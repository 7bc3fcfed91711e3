"""Training text for :mod:`qmamba.calib.train`: a byte-level BPE tokenizer trained with ``tokenizers``, the
corpus tokenized into one flat id stream, and seeded random windows of it as next-token batches.

Only the TRAIN split of a corpus (``full:train``, the full corpus, for the shipped fixture) may be used for training
(the tokenizer included):
:func:`training_text_files` refuses held-out and eval text. Files are joined with the end-of-text token, so a
model trained on the stream learns to emit it (``generate`` stops on it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from qmamba.data_files import is_corpus_spec, read_text, resolve_text_spec
from qmamba.errors import UserError

EOS_TOKEN = "<|endoftext|>"
ENCODE_CHUNK_CHARS = 1 << 20  # text is encoded in paragraph-aligned chunks of about this many characters


class TrainingDataError(UserError):
    """Training text that cannot be used (held-out text, too short, missing)."""


def training_text_files(specs: list[str]) -> list[Path]:
    """Files of the text specs (``full:train[/name]``, ``corpus:train[/name]`` or paths); held-out/eval text is
    refused."""
    files: list[Path] = []
    for spec in specs:
        if is_corpus_spec(spec) and not spec.split(":", 1)[1].startswith("train"):
            raise TrainingDataError(f"refusing to train on {spec!r}: only the train split (full:train or "
                                    "corpus:train) may be used for training; held-out text is for evaluation")
        for path in resolve_text_spec(spec, "train"):
            if any(part in ("heldout", "eval") for part in Path(path).resolve().parts[-3:-1]):
                raise TrainingDataError(f"refusing to train on {path}: it is held-out/eval text")
            files.append(Path(path))
    if not files:
        raise TrainingDataError("no training text given")
    return files


def _paragraph_chunks(text: str, max_chars: int = ENCODE_CHUNK_CHARS) -> list[str]:
    """Split ``text`` at blank lines into pieces of at most about ``max_chars`` (concatenation == text)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        chunks.append(text[start:end])
        start = end
    return chunks


def train_bpe_tokenizer(files: list[Path], vocab_size: int, out_path: Path | None = None, *, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, ``<|endoftext|>`` = id 0) on ``files``.

    Returns the ``tokenizers.Tokenizer``; also saved to ``out_path`` when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise TrainingDataError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs > 257)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts() -> Iterator[str]:
        for path in files:
            yield from _paragraph_chunks(read_text(path), 1 << 16)

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out_path))
    return tokenizer


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as int64 ``[N]`` (encoded in paragraph-aligned chunks, so long texts are fine)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(_paragraph_chunks(text), add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)


def token_stream(tokenizer, files: list[Path], eos_id: int | None) -> torch.Tensor:
    """All files tokenized and concatenated, each followed by ``eos_id`` (when not None): int64 ``[N]``."""
    parts = []
    for path in files:
        parts.append(encode_text(tokenizer, read_text(path)))
        if eos_id is not None:
            parts.append(torch.tensor([eos_id], dtype=torch.int64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class RandomWindows:
    """Endless seeded batches of ``(inputs [B, L], targets [B, L])`` from random windows of ``ids [N]``."""

    def __init__(self, ids: torch.Tensor, batch: int, seq_len: int, seed: int = 0, device=None):
        if ids.dim() != 1 or ids.numel() < seq_len + 2:
            raise TrainingDataError(f"training text has {ids.numel()} tokens, fewer than seq_len + 2 = "
                                    f"{seq_len + 2}")
        self.ids, self.batch, self.seq_len, self.device = ids, int(batch), int(seq_len), device
        self.generator = torch.Generator().manual_seed(int(seed))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.ids.numel() - self.seq_len - 1, (self.batch,), generator=self.generator)
        offsets = torch.arange(self.seq_len + 1)
        window = self.ids[starts[:, None] + offsets[None, :]]
        window = window.to(self.device) if self.device is not None else window
        return window[:, :-1], window[:, 1:]


def consecutive_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[W, seq_len + 1]`` covering ``ids`` (the last one shares a token with the next
    window start, so every token but the first is a target exactly once); for evaluation."""
    n = (ids.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n <= 0:
        raise TrainingDataError(f"evaluation text has {ids.numel()} tokens, fewer than seq_len + 1")
    starts = torch.arange(n) * seq_len
    return ids[starts[:, None] + torch.arange(seq_len + 1)[None, :]]


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``eval_ids`` under the add-one-smoothed unigram distribution of
    ``train_ids``: the baseline a trained model must beat clearly."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_ids].mean()) if eval_ids.numel() else math.nan
