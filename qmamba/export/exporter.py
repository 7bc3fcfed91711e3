"""``export_checkpoint``: a qmamba checkpoint -> one ``.onnx`` file (plus external weight data when large), checked
with ``onnx.checker`` (full check), written atomically, and a summary of what it holds.

    summary = export_checkpoint("ckpt_dir", "model.onnx", ExportOptions(scan="linear-attention", dtype="fp32"))
    print(summary.describe())

The checkpoint's tokenizer (its ``tokenizer.json``, or for the GPT-NeoX vocabulary of published BlackMamba/Mamba
directories the one shipped with qmamba, as :func:`qmamba.tokenizer.resolve_tokenizer` finds it) is copied beside
the output as ``OUT.tokenizer.json`` (``model.onnx`` -> ``model.tokenizer.json``) and its name recorded in the
model's metadata (``qmamba.tokenizer``), so ``qmamba generate model.onnx`` finds the right one even when several
exports share a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qmamba.errors import ConfigError, UserError

EXTERNAL_DATA_MODES = ("auto", "always", "never")
AUTO_EXTERNAL_BYTES = 512 << 20  # above this much weight data, tensors go to OUT.onnx.data
PROTOBUF_LIMIT = 2 << 30  # a single protobuf file cannot exceed 2 GiB


class ExportDependencyError(UserError):
    """onnx or onnxruntime is missing."""


def require(module: str, purpose: str):
    """Import ``module`` or raise :class:`ExportDependencyError` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportDependencyError(f"{purpose} needs the Python package {module!r}, which is not installed; "
                                    "install it with: pip install 'qmamba[export]'") from None


class ExportError(UserError):
    """The output cannot be written (exists, bad path) or the exported model fails the checker."""


@dataclass
class ExportSummary:
    path: Path
    data_path: Path | None
    file_bytes: int
    ops: dict[str, int]
    options: dict
    quantized_modules: int
    quantized_modules_weights: int = 0  # MatMulNBits weights written (stacked experts count once per expert)
    tokenizer: Path | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        size = self.file_bytes / 2 ** 20
        lines = [f"wrote {self.path} ({size:.2f} MiB{', weights in ' + self.data_path.name if self.data_path else ''})",
                 "options: " + ", ".join(f"{k}={v}" for k, v in self.options.items()),
                 f"quantized modules: {self.quantized_modules}",
                 "ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(self.ops.items()))]
        if self.tokenizer:
            lines.append(f"tokenizer: {self.tokenizer}")
        return "\n".join(lines + self.notes)


def _weight_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def check_output_path(out, overwrite: bool = False) -> Path:
    """The output ``.onnx`` path, checked before any work: suffix, an existing file, the folder."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"the output file must end in .onnx, got {out}")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ExportError(f"output directory {out.parent} does not exist")
    from qmamba.output_files import check_writable_dir

    check_writable_dir(out.parent, f"output file {out}")
    return out


def save_checked(model, out: Path, external_data: str = "auto", overwrite: bool = False) -> Path | None:
    """Write ``model`` to ``out`` atomically after ``onnx.checker`` (full check) accepted it; returns the external
    data file (or None). Nothing is left behind when the check or the write fails."""
    onnx = require("onnx", "ONNX export")
    if external_data not in EXTERNAL_DATA_MODES:
        raise ConfigError(f"external_data must be one of {EXTERNAL_DATA_MODES}, got {external_data!r}")
    out = check_output_path(out, overwrite)
    weight_bytes = _weight_bytes(model)
    external = external_data == "always" or (external_data == "auto" and weight_bytes > AUTO_EXTERNAL_BYTES)
    if not external and weight_bytes > PROTOBUF_LIMIT - (64 << 20):
        raise ExportError(f"the weights ({weight_bytes / 2**30:.2f} GiB) exceed protobuf's 2 GiB limit: use external "
                          "data (--external-data auto|always)")
    data_name = out.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_model = tmp / out.name
        if external:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_model))
        try:
            onnx.checker.check_model(str(tmp_model), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0]}") from None
        umask = os.umask(0)
        os.umask(umask)
        for written in tmp.iterdir():  # temporary files are private; the outputs get the usual permissions
            os.chmod(written, 0o666 & ~umask)
        if external:
            os.replace(tmp / data_name, out.parent / data_name)
        elif (out.parent / data_name).exists() and overwrite:
            (out.parent / data_name).unlink()  # stale weights of an earlier external-data export
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.parent / data_name if external else None


TOKENIZER_SUFFIX = ".tokenizer.json"
TOKENIZER_METADATA_KEY = "qmamba.tokenizer"  # file name of the export's tokenizer beside it ("" = none)


def tokenizer_path_for(onnx_path) -> Path:
    """``dir/model.onnx`` -> ``dir/model.tokenizer.json``: every export has its own tokenizer file, named after it,
    so several exports in one folder never share one."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + TOKENIZER_SUFFIX)


def export_tokenizer_file(onnx_path, metadata: dict) -> Path | None:
    """The tokenizer of an export: the file its metadata names (beside it); for exports made before that record,
    ``OUT.tokenizer.json`` when there is one, else ``None`` (:func:`qmamba.tokenizer.resolve_tokenizer` then looks
    beside the file)."""
    from qmamba.tokenizer import TokenizerError

    onnx_path = Path(onnx_path)
    if TOKENIZER_METADATA_KEY in metadata:
        name = Path(metadata[TOKENIZER_METADATA_KEY]).name
        if not name:
            raise TokenizerError(f"{onnx_path} was exported without a tokenizer: pass --tokenizer FILE")
        path = onnx_path.parent / name
        if not path.is_file():
            raise TokenizerError(f"the tokenizer of {onnx_path}, {path}, is missing: put it back or pass "
                                 "--tokenizer FILE")
        return path
    named = tokenizer_path_for(onnx_path)
    return named if named.is_file() else None


def _stage_tokenizer(checkpoint_dir: Path | None, out: Path, vocab_size: int) -> tuple[Path | None, list[str]]:
    """Copy the checkpoint's tokenizer (:func:`qmamba.tokenizer.resolve_tokenizer`: its own, or GPT-NeoX-20B's for
    that vocabulary) to a temporary file beside ``out`` (renamed once the model is written)."""
    from qmamba.tokenizer import TokenizerError, resolve_tokenizer

    if checkpoint_dir is None:
        return None, ["note: the checkpoint has no tokenizer.json; pass --tokenizer to qmamba generate"]
    notes = []
    try:
        src = resolve_tokenizer(checkpoint_dir, None, vocab_size, notice=notes.append).path
    except TokenizerError as exc:
        return None, [f"note: the checkpoint has no tokenizer.json ({exc}); pass --tokenizer to qmamba generate"]
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tokenizer.tmp", dir=out.parent)
    os.close(fd)
    shutil.copyfile(src, tmp)
    return Path(tmp), notes


def _place_tokenizer(staged: Path | None, out: Path) -> Path | None:
    """Move the staged tokenizer to ``OUT.tokenizer.json``; without one, remove a stale file of that name."""
    dst = tokenizer_path_for(out)
    if staged is None:
        dst.unlink(missing_ok=True)
        return None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o666 & ~umask)
    os.replace(staged, dst)
    return dst


def export_model(cfg, state_dict: dict, manifest: dict | None, out, options=None, *, external_data: str = "auto",
                 overwrite: bool = False, checkpoint_dir: Path | None = None) -> ExportSummary:
    """Export an in-memory checkpoint ``(cfg, state_dict, manifest)`` to ``out`` (see module doc)."""
    require("onnx", "ONNX export")
    from .graph import ExportOptions, GraphBuilder

    options = options or ExportOptions()
    out = check_output_path(out, overwrite)
    quantization = (manifest or {}).get("quantization") or None
    builder = GraphBuilder(cfg, state_dict, quantization, options)
    model = builder.build()
    staged, notes = _stage_tokenizer(checkpoint_dir, out, cfg.vocab_size)
    entry = model.metadata_props.add()
    entry.key, entry.value = TOKENIZER_METADATA_KEY, tokenizer_path_for(out).name if staged else ""
    try:
        data_path = save_checked(model, out, external_data, overwrite)
        tokenizer = _place_tokenizer(staged, out)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
    size = out.stat().st_size + (data_path.stat().st_size if data_path else 0)
    opts = {"scan": options.scan, "conv": options.conv_impl, "dtype": options.dtype, "opset": options.opset,
            "accuracy_level": options.accuracy_level}
    return ExportSummary(out, data_path, size, dict(builder.ops_used), opts, len(builder.formats),
                         builder.packed_weights, tokenizer, notes)


def export_checkpoint(path, out, options=None, *, external_data: str = "auto",
                      overwrite: bool = False) -> ExportSummary:
    """Read the checkpoint at ``path`` (any format ``qmamba.checkpoints.read_checkpoint`` knows) and export it."""
    require("onnx", "ONNX export")
    from qmamba.checkpoints.detect import resolve_checkpoint_dir
    from qmamba.checkpoints.detect import read_checkpoint

    check_output_path(out, overwrite)  # before reading a possibly large checkpoint
    directory = resolve_checkpoint_dir(path)
    cfg, state_dict, manifest = read_checkpoint(directory, hash_files=False)
    return export_model(cfg, state_dict, manifest, out, options, external_data=external_data, overwrite=overwrite,
                        checkpoint_dir=directory)
