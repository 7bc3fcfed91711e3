"""Where the text data lives and how to read it (used by ``qmamba eval`` and the calibration pipeline).

Two sources with the same layout (``corpus/{train,heldout}/*.txt.xz``, ``eval/lambada_openai.jsonl.gz``):

* the text shipped in the package, ``qmamba/assets/data/`` (see its README: a calibration slice of the train
  split, the whole held-out split, LAMBADA; 1.6 MB): the default everywhere, present wherever qmamba is installed;
* the full pinned corpus (optional, larger train split): ``$QMAMBA_DATA_DIR`` when set, else ``../shared/data``
  beside the repository checkout.

Text specs:

    corpus:heldout               every held-out file shipped, concatenated in name order (blank line between)
    corpus:heldout/shakespeare   one file of a split
    corpus:train[/name]          the shipped train slice (calibration only; never evaluate on it)
    full:heldout, full:train...  the same from the full corpus
    PATH                         a plain, .xz or .gz UTF-8 text file
"""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

from qmamba.errors import UserError

SPLITS = ("train", "heldout")
PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "assets" / "data"
SOURCES = {"corpus": "the text shipped with qmamba", "full": "the full corpus"}


class DataError(UserError):
    """Missing or unreadable data files."""


CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root when qmamba runs from a checkout


def find_data_dir() -> Path:
    """The directory of the full corpus (``full:`` specs); a clear error when it cannot be found."""
    env = os.environ.get("QMAMBA_DATA_DIR")
    if env:
        candidates = [Path(env)]
    elif (CHECKOUT / "pyproject.toml").is_file():  # a checkout: ../shared/data beside it
        candidates = [CHECKOUT.parent / "shared" / "data", CHECKOUT / "shared" / "data"]
    else:  # an installed package: no folder beside it to look at
        candidates = []
    for path in candidates:
        if (path / "corpus").is_dir():
            return path
    where = (f"looked at $QMAMBA_DATA_DIR={env}" if env else
             f"looked at {' or '.join(str(p) for p in candidates)}" if candidates else "QMAMBA_DATA_DIR is not set")
    raise DataError(f"full corpus not found ({where}); set QMAMBA_DATA_DIR to the folder that holds "
                    "corpus/ and eval/, or use the text shipped with qmamba (corpus:train, corpus:heldout)")


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


def source_dir(source: str) -> Path:
    """Data directory of a spec source: ``"corpus"`` (shipped) or ``"full"`` (:func:`find_data_dir`)."""
    if source == "corpus":
        if not (PACKAGED_DATA_DIR / "corpus").is_dir():
            raise DataError(f"the text shipped with qmamba is missing from {PACKAGED_DATA_DIR} (broken install?)")
        return PACKAGED_DATA_DIR
    if source == "full":
        return find_data_dir()
    raise DataError(f"unknown text source {source!r}; use one of {', '.join(SOURCES)}")


def is_corpus_spec(spec) -> bool:
    """Whether ``spec`` names a split of a corpus (``corpus:...`` or ``full:...``) rather than a file."""
    return str(spec).split(":", 1)[0] in SOURCES and ":" in str(spec)


def corpus_files(spec: str) -> list[Path]:
    """Files of a ``corpus:SPLIT[/name]`` or ``full:SPLIT[/name]`` spec, in name order."""
    source, rest = spec.split(":", 1)
    split, _, name = rest.partition("/")
    if split not in SPLITS:
        raise DataError(f"unknown corpus split {split!r} in {spec!r}; use one of {SPLITS}")
    folder = source_dir(source) / "corpus" / split
    files = sorted(folder.glob("*.txt.xz"))
    if name:
        files = [f for f in files if f.name.split(".")[0] == name]
        if not files:
            known = sorted(f.name.split(".")[0] for f in folder.glob("*.txt.xz"))
            raise DataError(f"no corpus file {name!r} in split {split!r} of {SOURCES[source]}; known: "
                            f"{', '.join(known)}")
    if not files:
        raise DataError(f"no *.txt.xz files in {folder}")
    return files


def resolve_text_spec(spec: str) -> list[Path]:
    """Files named by a text spec (see module docstring)."""
    if is_corpus_spec(spec):
        return corpus_files(spec)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"text file not found: {spec} (or use corpus:heldout / corpus:heldout/NAME)")
    return [path]


def load_text_spec(spec: str) -> str:
    """The text of a spec: files joined by a blank line."""
    return "\n\n".join(read_text(p) for p in resolve_text_spec(spec))


def lambada_path() -> Path:
    """LAMBADA (OpenAI test split) as shipped with qmamba (an exact copy of the full corpus's)."""
    path = PACKAGED_DATA_DIR / "eval" / "lambada_openai.jsonl.gz"
    if not path.is_file():
        raise DataError(f"LAMBADA file not found: {path} (broken install?)")
    return path
