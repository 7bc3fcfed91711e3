"""Calibration data: N token sequences of L tokens from text files or a corpus (TRAIN split only).

``--calib corpus`` (the default source) draws N windows at seeded random positions of the train text shipped with
qmamba (``qmamba/assets/data``; ``--calib full`` the same from the full corpus, see :mod:`qmamba.data_files`): file
chosen round-robin, a random character offset, the text after it tokenized, the first token dropped because it may
be a partial word. ``--calib FILE...`` tokenizes the files (joined by a blank line) and cuts consecutive windows of L
tokens; asking for more sequences than the text holds is an error, never a silent shortfall. The sequences are
hashed (sha256 of the int32 ids) into the manifest.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from qmamba.data_files import corpus_files, hub_text_file, is_corpus_spec, is_hub_spec, read_text
from qmamba.errors import UserError


class CalibrationDataError(UserError):
    """Calibration text that cannot give the requested sequences."""


@dataclass
class CalibrationData:
    """``ids [N, L]`` int64 plus a description for the manifest."""

    ids: torch.Tensor
    source: str
    files: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ids.to(torch.int32).numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "files": self.files, "nsamples": int(self.ids.shape[0]),
                "seq_len": int(self.ids.shape[1]), "sha256": self.sha256}


def _check_vocab(ids: torch.Tensor, vocab_size: int | None, what: str) -> None:
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise CalibrationDataError(f"{what}: token id {int(ids.max())} is outside the model's vocabulary "
                                   f"({vocab_size}); is the tokenizer the checkpoint's?")


def _check_counts(nsamples: int, seq_len: int) -> None:
    if nsamples <= 0 or seq_len <= 0:
        raise CalibrationDataError(f"--nsamples and --seq-len must be positive, got {nsamples} and {seq_len}")


def calibration_from_files(files, tokenizer, nsamples: int, seq_len: int, vocab_size=None) -> CalibrationData:
    """Consecutive windows of ``seq_len`` tokens from the concatenated files."""
    _check_counts(nsamples, seq_len)
    texts = [read_text(f) for f in files]
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise CalibrationDataError(f"calibration text is empty: {', '.join(str(f) for f in files)}")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    available = ids.numel() // seq_len
    if available < nsamples:
        raise CalibrationDataError(
            f"calibration text is too short: {ids.numel()} tokens give {available} sequences of {seq_len} tokens, "
            f"{nsamples} requested; pass more text, or a smaller --nsamples/--seq-len")
    ids = ids[: nsamples * seq_len].reshape(nsamples, seq_len)
    _check_vocab(ids, vocab_size, "calibration text")
    return CalibrationData(ids, "files", [str(f) for f in files])


def calibration_from_corpus(tokenizer, nsamples: int, seq_len: int, seed: int = 0, vocab_size=None,
                            chars_per_token: int = 8, source: str = "corpus") -> CalibrationData:
    """Seeded random windows from the TRAIN split of ``source``: ``"corpus"`` (shipped) or ``"full"``."""
    _check_counts(nsamples, seq_len)
    files = corpus_files(f"{source}:train")
    texts = [read_text(f) for f in files]
    rng = random.Random(seed)
    rows = []
    for i in range(nsamples):
        text = texts[i % len(texts)]
        n_chars = seq_len * chars_per_token
        while True:
            start = rng.randrange(0, max(1, len(text) - n_chars))
            ids = tokenizer.encode(text[start: start + n_chars])[1: seq_len + 1]
            if len(ids) == seq_len:
                break
            if n_chars > len(text):
                raise CalibrationDataError(f"corpus file {files[i % len(files)]} is shorter than {seq_len} tokens")
            n_chars *= 2
        rows.append(ids)
    ids = torch.tensor(rows, dtype=torch.int64)
    _check_vocab(ids, vocab_size, "corpus calibration")
    return CalibrationData(ids, f"{source}:train seed={seed}", [f.name for f in files])


DEFAULT_CALIBRATION = ("corpus",)


def load_calibration(spec, tokenizer, nsamples: int, seq_len: int, seed: int = 0,
                     vocab_size=None) -> CalibrationData:
    """``spec`` is ``["corpus"]`` (the shipped train slice), ``["full"]`` (the full corpus's train split) or a
    list of text files; ``tokenizer`` a :class:`qmamba.tokenizer.TextTokenizer`."""
    spec = [str(s) for s in spec]
    if not spec:
        raise CalibrationDataError("no calibration data given (use --calib corpus or --calib FILE...)")
    if len(spec) == 1 and spec[0] in ("corpus", "corpus:train", "full", "full:train"):
        return calibration_from_corpus(tokenizer, nsamples, seq_len, seed, vocab_size, source=spec[0].split(":")[0])
    for item in spec:
        if item in ("corpus", "full") or is_corpus_spec(item):
            raise CalibrationDataError(f"calibration must not use {item!r}: only the train split "
                                       "(--calib corpus or --calib full, alone), hub datasets or text files")
    files = [hub_text_file(item, "train") if is_hub_spec(item) else item for item in spec]
    return calibration_from_files(files, tokenizer, nsamples, seq_len, vocab_size)
