"""Small result files (``--json OUT.json`` of eval, generate, quantize): checked before the long work starts, and
written atomically (a temporary file beside the target, renamed), so a failed run never leaves half a file.

    check_output_file(path)          # UserError now, not after an hour of evaluation
    write_json_file(path, result)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qmamba.errors import UserError


class OutputFileError(UserError):
    """An output file that cannot be written where the user asked."""


def check_writable_dir(directory, what: str) -> None:
    """A :class:`OutputFileError` naming ``what`` unless something can be created in ``directory``, tried by
    making and removing an empty folder there (permissions, read-only and special file systems alike)."""
    try:
        probe = tempfile.mkdtemp(prefix=".qmamba-write-check-", dir=directory)
    except OSError as exc:
        raise OutputFileError(f"{what}: cannot write in {directory} ({exc.strerror or exc})") from None
    os.rmdir(probe)


def check_output_file(path, option: str = "--json") -> Path:
    """``path`` as a :class:`Path` if a file can be written there (an existing file is replaced)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputFileError(f"{option} {path}: is a directory; give a file name such as {path / 'result.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputFileError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputFileError(f"{option} {path}: not writable")
    check_writable_dir(parent, f"{option} {path}")
    return path


def write_json_file(path, data, option: str = "--json") -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    path = check_output_file(path, option)
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp files are private; results get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
