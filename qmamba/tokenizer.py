"""Text <-> token ids through a ``tokenizers`` ``tokenizer.json`` (GPT-NeoX's for BlackMamba/Mamba, or the
fixture's byte-level BPE), with end-of-text detection and incremental (streaming) decoding.

    tok = resolve_tokenizer(checkpoint_dir, explicit=None, vocab_size=model.config.vocab_size)
    ids = tok.encode("Hello")            # list[int]
    text = tok.decode(ids)
    dec = tok.stream_decoder(); dec.push([id]) -> text that is safe to print now; dec.flush() at the end

:func:`resolve_tokenizer` is the one place that decides which tokenizer a checkpoint gets (every command and
script goes through it); :func:`load_tokenizer` reads one given file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from qmamba.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
# end-of-text spellings, most common first (GPT-NeoX/GPT-2, Llama/T5, others)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
# GPT-NeoX-20B's tokenizer, shipped in the package (see qmamba/assets/tokenizers/README.md)
NEOX_TOKENIZER_FILE = Path(__file__).resolve().parent / "assets" / "tokenizers" / "gpt-neox-20b.json"
NEOX_NAME = "GPT-NeoX-20B"
# embedding sizes of models trained with that vocabulary: its 50,277 tokens padded up to a multiple of 8..128
# (Mamba 50280, BlackMamba 50304, HF exports) or 50432 (GPT-NeoX-20B's own padded embedding)
NEOX_VOCAB_SIZES = frozenset(range(50277, 50305)) | {50432}


class TokenizerError(UserError):
    """A tokenizer that is missing or cannot be read."""


def is_neox_vocab(vocab_size: int | None) -> bool:
    """Whether a model's vocabulary size is that of GPT-NeoX-20B (padded as BlackMamba/Mamba store it)."""
    return vocab_size is not None and int(vocab_size) in NEOX_VOCAB_SIZES


def _print_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _hub_tokenizer(repo_id: str) -> Path:
    """``tokenizer.json`` of a Hugging Face hub repository (needs ``huggingface_hub`` and a network)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise TokenizerError(f"tokenizer {repo_id!r} is not a local file, and huggingface_hub is not installed to "
                             "fetch it as a hub id (pip install 'qmamba[hub]')") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=TOKENIZER_FILE))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no tokenizer.json in it ...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise TokenizerError(f"tokenizer {repo_id!r} is not a local file and its {TOKENIZER_FILE} could not be "
                             f"fetched from the Hugging Face hub: {type(exc).__name__}: {first}") from None


def _explicit_tokenizer_file(explicit) -> tuple[Path, str]:
    """``(file, origin)`` for ``--tokenizer``: a file, a directory holding ``tokenizer.json``, or a hub id."""
    from qmamba.checkpoints.detect import looks_like_hub_id

    path = Path(explicit).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.is_file():
        return path, "explicit"
    if looks_like_hub_id(str(explicit)) and not Path(str(explicit).split("/")[0]).expanduser().exists():
        return _hub_tokenizer(str(explicit)), "hub"  # "owner/name", and nothing named "owner" here
    raise TokenizerError(f"tokenizer file not found: {path}")


def resolve_tokenizer(checkpoint=None, explicit=None, vocab_size: int | None = None, *,
                      notice: Callable[[str], None] | None = _print_notice) -> "TextTokenizer":
    """The tokenizer to use for a checkpoint, in this order:

    1. ``explicit`` (``--tokenizer``): a ``tokenizer.json``, a directory holding one, or a Hugging Face hub id
       (``owner/name``; needs ``huggingface_hub`` and a network);
    2. ``tokenizer.json`` in the checkpoint directory (or beside a checkpoint file such as ``model.onnx``);
    3. when ``vocab_size`` is GPT-NeoX-20B's (:data:`NEOX_VOCAB_SIZES`: BlackMamba, Mamba), the NeoX tokenizer
       shipped with qmamba; ``notice`` gets one line naming it (default: printed to stderr; ``None``: quiet);
    4. otherwise a :class:`TokenizerError` saying what to pass.

    A tokenizer with more tokens than ``vocab_size`` (when given) is refused: it is not the model's. The result's
    ``path`` is the file used (a writer copies it into the checkpoint it writes) and ``origin`` one of
    ``"explicit"``, ``"hub"``, ``"checkpoint"``, ``"packaged"``.

    ``checkpoint``: a checkpoint directory (or hub id), or a file inside one; when ``vocab_size`` is not given and
    ``checkpoint`` is not a file, it is read from the checkpoint's config (no weights are read; a config that
    cannot be read only matters when the vocabulary decides).
    """
    if checkpoint is not None and vocab_size is None and not Path(checkpoint).is_file():
        from qmamba.checkpoints.peek import read_config

        try:
            checkpoint, cfg = read_config(checkpoint)
            vocab_size = cfg.vocab_size
        except UserError:
            folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
            if explicit is None and not (folder / TOKENIZER_FILE).is_file():
                raise
    if explicit is not None:
        path, origin = _explicit_tokenizer_file(explicit)
    else:
        if checkpoint is None and vocab_size is None:
            raise TokenizerError("no tokenizer given: pass --tokenizer FILE (a tokenizers tokenizer.json)")
        folder = None
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
        path = folder / TOKENIZER_FILE if folder is not None else None
        if path is not None and path.is_file():
            origin = "checkpoint"
        elif is_neox_vocab(vocab_size):
            path, origin = NEOX_TOKENIZER_FILE, "packaged"
            if notice is not None:
                where = f"{folder} has no {TOKENIZER_FILE}" if folder is not None else f"no {TOKENIZER_FILE} given"
                notice(f"note: {where}; its vocabulary ({vocab_size}) is {NEOX_NAME}'s: using the {NEOX_NAME} "
                       f"tokenizer shipped with qmamba ({path})")
        else:
            where = f"no {TOKENIZER_FILE} in {folder}" if folder is not None else f"no {TOKENIZER_FILE} given"
            vocab = (f"its vocabulary ({vocab_size} tokens) is not {NEOX_NAME}'s, the one qmamba ships"
                     if vocab_size is not None else "its vocabulary size is unknown")
            raise TokenizerError(f"{where} and {vocab}: pass --tokenizer FILE (a tokenizers tokenizer.json) or a "
                                 "hub id")
    tok = load_tokenizer(path)
    tok.origin = origin
    if vocab_size is not None and tok.vocab_size > int(vocab_size):
        raise TokenizerError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary is "
                             f"{vocab_size}: it is not this model's tokenizer")
    return tok


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
        self.origin = "file"  # set by resolve_tokenizer: explicit, hub, checkpoint or packaged
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
