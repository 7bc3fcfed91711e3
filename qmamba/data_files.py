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
    hub:NAME[,CONFIG][@SPLIT]    a Hugging Face hub dataset's text column (needs the ``datasets`` package and a
                                 network, or its cache), e.g. ``hub:Salesforce/wikitext,wikitext-2-raw-v1@test``;
                                 SPLIT defaults to train for calibration and test for evaluation. The text is
                                 written once to a cache file (``$QMAMBA_CACHE_DIR``, default ~/.cache/qmamba)
    PATH                         a plain, .xz or .gz UTF-8 text file
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
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


def is_hub_spec(spec) -> bool:
    return str(spec).startswith("hub:")


def cache_dir() -> Path:
    env = os.environ.get("QMAMBA_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qmamba"


def parse_hub_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """``hub:NAME[,CONFIG][@SPLIT]`` -> ``(name, config or None, split)``."""
    m = re.fullmatch(r"hub:([^,@\s]+)(?:,([^@\s]+))?(?:@([\w.\[\]:%+-]+))?", str(spec))
    if not m:
        raise DataError(f"bad hub dataset spec {spec!r}: use hub:NAME[,CONFIG][@SPLIT], "
                        "e.g. hub:Salesforce/wikitext,wikitext-2-raw-v1@test")
    return m.group(1), m.group(2), m.group(3) or default_split


def hub_text_file(spec: str, default_split: str = "train") -> Path:
    """The text column of a hub dataset split (see the module docstring), as a cached UTF-8 file."""
    name, config, split = parse_hub_spec(spec, default_split)
    key = f"{name},{config or ''}@{split}"
    safe = re.sub(r"[^\w.-]+", "_", key)[:80] + "-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    path = cache_dir() / "hub-text" / f"{safe}.txt"
    if path.is_file():
        return path
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: hub datasets need the `datasets` package (pip install datasets) and a network; "
                        "or pass a text file") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name/config/split: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load hub dataset {name!r} (config {config!r}, split {split!r}): {first}") from None
    columns = dict(getattr(ds, "features", {}) or {})
    text_cols = ["text"] if "text" in columns else [c for c, f in columns.items()
                                                   if getattr(f, "dtype", None) in ("string", "large_string")]
    if not text_cols:
        raise DataError(f"hub dataset {name!r} has no text column (columns: {', '.join(columns) or 'none'})")
    text = "\n".join(t for t in ds[text_cols[0]] if isinstance(t, str))
    if not text.strip():
        raise DataError(f"hub dataset {name!r} split {split!r}: column {text_cols[0]!r} holds no text")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def resolve_text_spec(spec: str, default_split: str = "test") -> list[Path]:
    """Files named by a text spec (see module docstring); ``default_split`` for ``hub:`` specs without one."""
    if is_hub_spec(spec):
        return [hub_text_file(spec, default_split)]
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
