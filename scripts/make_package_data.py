"""Build the text shipped inside the package (``qmamba/assets/data/``) from the full pinned corpus
(``../shared/data`` or ``$QMAMBA_DATA_DIR``). Deterministic: rerunning gives byte-identical files.

* ``corpus/train/NAME.txt.xz``: a calibration slice of each train file: ``CHUNKS`` pieces of about ``CHUNK_CHARS``
  characters taken at evenly spaced positions through the file, each cut at blank lines (so paragraphs stay whole),
  joined by a blank line.
* ``corpus/heldout/NAME.txt.xz`` and ``eval/lambada_openai.jsonl.gz``: copies of the full held-out files and of
  LAMBADA (they are small).

    PYTHONPATH=. python scripts/make_package_data.py [--out qmamba/assets/data]
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import shutil
from pathlib import Path

CHUNKS = 8
CHUNK_CHARS = 40_000


def slice_text(text: str, chunks: int = CHUNKS, chunk_chars: int = CHUNK_CHARS) -> str:
    """``chunks`` blank-line-aligned pieces of about ``chunk_chars`` characters at evenly spaced offsets."""
    pieces = []
    for i in range(chunks):
        start = len(text) * i // chunks
        if start:
            cut = text.find("\n\n", start)
            start = cut + 2 if cut >= 0 else len(text)
        end = text.rfind("\n\n", start, start + chunk_chars)
        end = end if end > start else min(len(text), start + chunk_chars)
        piece = text[start:end].strip("\n")
        if piece:
            pieces.append(piece)
    return "\n\n".join(pieces) + "\n"


def write_xz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8", preset=9) as f:
        f.write(text)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    from qmamba.data_files import find_data_dir, read_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "qmamba" / "assets" / "data"))
    args = ap.parse_args()
    src, out = find_data_dir(), Path(args.out)
    for path in sorted((src / "corpus" / "train").glob("*.txt.xz")):
        text = slice_text(read_text(path))
        write_xz(out / "corpus" / "train" / path.name, text)
        print(f"train/{path.name}: {len(text):,} chars, {(out / 'corpus' / 'train' / path.name).stat().st_size:,} B")
    for rel in [*(p.relative_to(src) for p in sorted((src / "corpus" / "heldout").glob("*.txt.xz"))),
                Path("eval/lambada_openai.jsonl.gz")]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, out / rel)
        print(f"{rel}: copied, {(out / rel).stat().st_size:,} B")
    for path in sorted(out.rglob("*.*z")):
        print(f"| `{path.relative_to(out)}` | `{sha256(path)}` |")


if __name__ == "__main__":
    main()
