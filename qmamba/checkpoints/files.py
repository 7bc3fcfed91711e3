"""File-level helpers shared by the checkpoint readers and writers: safe pickle and safetensors reading, JSON
config reading, sha256 hashing, and atomic output directories.

Checkpoints are untrusted input: pickles are read only with ``torch.load(..., weights_only=True)`` and every
failure becomes a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import torch

from qmamba.errors import CheckpointError, ConfigError

_HASH_CHUNK = 8 << 20
LOAD_MESSAGE_BYTES = 1 << 30  # weights files at least this large get a "loading ..." line on stderr


def human_bytes(n: float) -> str:
    """``5.6 GB``-style size (powers of 1000, as file managers show them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def announce_load(path: Path) -> None:
    """One line on stderr before a large weights file is read (reading 5.6 GB takes a while, silently)."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return
    if size >= LOAD_MESSAGE_BYTES:
        print(f"loading {path} ({human_bytes(size)}) ...", file=sys.stderr, flush=True)


def one_line(text: object, limit: int = 300) -> str:
    """First line of an exception message, shortened: CLI errors are one line."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(text).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def read_json(path: Path, what: str = "config") -> dict:
    """A JSON object from ``path``; a missing or malformed file is a :class:`CheckpointError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, huge ints
        raise CheckpointError(f"cannot read {what} file {path}: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_keys(config: dict, keys, path: Path) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise ConfigError(f"config file {path} lacks required key(s) {missing}")


_REQUIRED = object()


def config_int(config: dict, key: str, path: Path, default=_REQUIRED, minimum: int = 1,
               maximum: int | None = None) -> int:
    """``config[key]`` as an integer in ``[minimum, maximum]`` (a JSON integer; no strings, floats or booleans)."""
    value = config.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"config file {path} lacks required key {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (
            maximum is not None and value > maximum):
        bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ConfigError(f"config file {path}: {key} must be an integer {bounds}, got {value!r}")
    return value


def config_bool(config: dict, key: str, path: Path, default: bool) -> bool:
    """``config[key]`` as a JSON boolean (``"false"``, ``0`` or ``null`` would otherwise be read by truthiness)."""
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config file {path}: {key} must be true or false, got {value!r}")
    return value


def torch_load_safe(path: Path, mmap: bool = False):
    """``torch.load`` restricted to tensors and plain containers; any failure names the file.

    A pickle that references anything else (e.g. a ``__reduce__`` calling ``os.system``) is rejected by the
    weights-only unpickler before it can run. ``mmap=True``: tensors are memory-mapped views of the file, read
    only when touched (metadata such as shapes costs nothing); a legacy (non-zip) pickle is then read in full.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for the user
            warnings.simplefilter("ignore")
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
            announce_load(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure is the file's fault
        text = str(exc)
        globals_ = [ln.strip() for ln in text.splitlines() if "GLOBAL" in ln]
        if globals_:  # torch explains at length; keep the line naming what the pickle wanted to call
            raise CheckpointError(f"refusing to load {path}: the pickle references objects other than tensors "
                                  f"and plain containers, which could run code ({one_line(globals_[0], 160)})") from None
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            detail = [ln.strip() for ln in text.splitlines() if "nsupported" in ln]
            raise CheckpointError(f"cannot read weights file {path}: not a torch checkpoint that loads safely with "
                                  f"weights_only=True ({one_line(detail[0] if detail else text, 160)})") from None
        raise CheckpointError(f"cannot read weights file {path} (truncated or not a torch checkpoint?): "
                              f"{type(exc).__name__}: {one_line(text, 160)}") from None


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU; a truncated or corrupt file names the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    announce_load(path)
    try:
        return load_file(str(path), device="cpu")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): "
                              f"{one_line(exc, 160)}") from None


def check_tensor_dict(obj, path: Path, where: str = "") -> dict[str, torch.Tensor]:
    """``obj`` must be a mapping of str -> Tensor (a state dict)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}{where}: expected a state dict (mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(obj)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: Path, names, enabled: bool = True) -> dict[str, str | None]:
    """``{name: sha256}`` for the given files of ``directory`` (``None`` values when hashing is disabled)."""
    return {name: (sha256_file(Path(directory) / name) if enabled else None) for name in sorted(names)}


def dir_is_nonempty(path: Path) -> bool:
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any work) when ``out_dir`` may not be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} exists and is not a directory")
    if dir_is_nonempty(out_dir) and not overwrite:
        raise CheckpointError(f"output directory {out_dir} exists and is not empty (pass --overwrite to replace it)")
    if not out_dir.parent.exists():
        raise CheckpointError(f"parent directory of {out_dir} does not exist")
    from qmamba.output_files import check_writable_dir

    check_writable_dir(out_dir.parent, f"output directory {out_dir}")  # now, not when the result is saved


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def give_ordinary_permissions(root: Path) -> None:
    """Files under ``root`` (and ``root``) get the modes a plain ``open``/``mkdir`` gives: 0666 / 0777 minus the
    umask (0644 / 0755 for the usual 022). Some writers (safetensors) create private 0600 temporary files."""
    umask = current_umask()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o666 & ~umask)
        for name in dirnames:
            os.chmod(Path(dirpath) / name, 0o777 & ~umask)
    os.chmod(root, 0o777 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out_dir``; on success it is renamed to ``out_dir``.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and ``out_dir`` is left
    as it was: no half-written output ever appears under the final name. The files written get ordinary
    permissions (:func:`give_ordinary_permissions`).
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        give_ordinary_permissions(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_tokenizer_file(tokenizer_file) -> None:
    """Fail early (before any work) when a tokenizer file to copy does not exist."""
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise CheckpointError(f"tokenizer file not found: {tokenizer_file}")


def copy_tokenizer(tokenizer_file, out_dir: Path) -> None:
    """Copy a ``tokenizer.json`` into a checkpoint directory being written."""
    if tokenizer_file is None:
        return
    check_tokenizer_file(tokenizer_file)
    shutil.copyfile(tokenizer_file, Path(out_dir) / "tokenizer.json")


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
