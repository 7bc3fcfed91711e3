"""Where the shared text data lives and how to read it (used by ``qmamba eval`` and the calibration pipeline).

The data directory is ``$QMAMBA_DATA_DIR`` when set, else ``../shared/data`` beside the repository (the layout of
the ``shared/data`` folder: ``corpus/{train,heldout}/*.txt.xz``, ``eval/lambada_openai.jsonl.gz``). Text specs:

    corpus:heldout               every held-out file, concatenated in name order (documents joined by a blank line)
    corpus:heldout/shakespeare   one file of a split
    corpus:train[/name]          the train split (calibration only; never evaluate on it)
    PATH                         a plain, .xz or .gz UTF-8 text file
"""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

from qmamba.errors import UserError

SPLITS = ("train", "heldout")


class DataError(UserError):
    """Missing or unreadable data files."""


def find_data_dir() -> Path:
    """The shared data directory; a clear error when it cannot be found."""
    env = os.environ.get("QMAMBA_DATA_DIR")
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for path in candidates:
        if (path / "corpus").is_dir():
            return path
    where = f"$QMAMBA_DATA_DIR={env}" if env else " or ".join(str(p) for p in candidates)
    raise DataError(f"shared data directory not found (looked at {where}); set QMAMBA_DATA_DIR to the folder that "
                    "holds corpus/ and eval/")


def read_text(path: str | Path) -> str:
    """UTF-8 text of a plain, ``.xz`` or ``.gz`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    opener = lzma.open if path.suffix == ".xz" else gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError, lzma.LZMAError, EOFError) as exc:
        raise DataError(f"cannot read text file {path}: {exc}") from None


def corpus_files(spec: str) -> list[Path]:
    """Files of a ``corpus:SPLIT[/name]`` spec, in name order."""
    rest = spec.split(":", 1)[1]
    split, _, name = rest.partition("/")
    if split not in SPLITS:
        raise DataError(f"unknown corpus split {split!r} in {spec!r}; use one of {SPLITS}")
    folder = find_data_dir() / "corpus" / split
    files = sorted(folder.glob("*.txt.xz"))
    if name:
        files = [f for f in files if f.name.split(".")[0] == name]
        if not files:
            known = sorted(f.name.split(".")[0] for f in folder.glob("*.txt.xz"))
            raise DataError(f"no corpus file {name!r} in split {split!r}; known: {', '.join(known)}")
    if not files:
        raise DataError(f"no *.txt.xz files in {folder}")
    return files


def resolve_text_spec(spec: str) -> list[Path]:
    """Files named by a text spec (see module docstring)."""
    if spec.startswith("corpus:"):
        return corpus_files(spec)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"text file not found: {spec} (or use corpus:heldout / corpus:heldout/NAME)")
    return [path]


def load_text_spec(spec: str) -> str:
    """The text of a spec: files joined by a blank line."""
    return "\n\n".join(read_text(p) for p in resolve_text_spec(spec))


def lambada_path() -> Path:
    path = find_data_dir() / "eval" / "lambada_openai.jsonl.gz"
    if not path.is_file():
        raise DataError(f"LAMBADA file not found: {path}")
    return path
