"""Text <-> token ids through a ``tokenizers`` ``tokenizer.json`` (GPT-NeoX's for BlackMamba/Mamba, or the
fixture's byte-level BPE), with end-of-text detection and incremental (streaming) decoding.

    tok = load_tokenizer(find_tokenizer_file(checkpoint_dir, explicit=None))
    ids = tok.encode("Hello")            # list[int]
    text = tok.decode(ids)
    dec = tok.stream_decoder(); dec.push([id]) -> text that is safe to print now; dec.flush() at the end
"""

from __future__ import annotations

import json
from pathlib import Path

from qmamba.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
# end-of-text spellings, most common first (GPT-NeoX/GPT-2, Llama/T5, others)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


class TokenizerError(UserError):
    """A tokenizer that is missing or cannot be read."""


def find_tokenizer_file(checkpoint=None, explicit=None) -> Path:
    """The tokenizer file to use: ``explicit`` when given, else ``tokenizer.json`` in the checkpoint directory (or
    beside a checkpoint file such as ``model.onnx``). Raises :class:`TokenizerError` naming where it looked."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        return path
    if checkpoint is None:
        raise TokenizerError("no tokenizer given: pass --tokenizer FILE (a tokenizers tokenizer.json)")
    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"no {TOKENIZER_FILE} in {folder}; pass --tokenizer FILE (for BlackMamba/Mamba, the "
                             "GPT-NeoX-20B tokenizer.json)")
    return path


def _configured_eos(folder: Path) -> str | None:
    """``eos_token`` from a Hugging Face ``tokenizer_config.json``/``special_tokens_map.json`` beside the file."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


class TextTokenizer:
    """A loaded ``tokenizers.Tokenizer`` plus its end-of-text id (``None`` when it has none)."""

    def __init__(self, tokenizer, path: Path | None = None):
        self.tokenizer = tokenizer
        self.path = path
        self.eos_token_id = self._detect_eos(path)

    def _detect_eos(self, path: Path | None) -> int | None:
        names = list(EOS_CANDIDATES)
        configured = _configured_eos(path.parent) if path is not None else None
        if configured:
            names.insert(0, configured)
        for name in names:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


def load_tokenizer(path) -> TextTokenizer:
    """Load a ``tokenizer.json``; :class:`TokenizerError` when missing or unreadable."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), path)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions on bad files
        raise TokenizerError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0][:200]}") from None


class IncrementalDecoder:
    """Turns a growing id sequence into printable text pieces without splitting multi-byte characters.

    Byte-level BPE tokens can end inside a UTF-8 character; decoding such a prefix yields U+FFFD. The decoder keeps
    a short window of ids (from ``prefix`` on) and only emits text once it no longer ends in U+FFFD; the window
    also gives tokenizers that strip a leading space per call (SentencePiece) the left context they need. The
    concatenation of every ``push`` and the final ``flush`` equals ``decode(all ids)`` (tests check it).
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this have been emitted

    def push(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is emitted as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]
