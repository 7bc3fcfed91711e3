"""Each ONNX export gets its own tokenizer file, named after it (issue 15, case 9): two exports in one folder never
share one, and ``qmamba generate B.onnx`` decodes with B's tokenizer (the same text as the torch checkpoint)."""

import pytest
from click.testing import CliRunner

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qmamba.calib.text_data import train_bpe_tokenizer  # noqa: E402
from qmamba.checkpoints.random_init import create_checkpoint  # noqa: E402
from qmamba.cli import main  # noqa: E402


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two tiny-mamba checkpoints with different tokenizers (trained on different text)."""
    root = tmp_path_factory.mktemp("two")
    made = {}
    for name, words, vocab in (("a", "Once upon a time there was a king. ", 300),
                               ("b", "Zebras quietly juggle seven yellow kites! ", 400)):
        text = root / f"{name}.txt"
        text.write_text(words * 60, encoding="utf-8")
        train_bpe_tokenizer([text], vocab, root / f"{name}-tokenizer.json")
        made[name] = create_checkpoint("tiny-mamba", "qmamba", root / name, seed=ord(name), dtype="float32",
                                       tokenizer_file=root / f"{name}-tokenizer.json")
    return made


def test_two_exports_in_one_folder_keep_their_tokenizers(two_checkpoints, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    for name, ckpt in two_checkpoints.items():
        code, output, _ = run("export", ckpt, "-o", out / f"{name}.onnx")
        assert code == 0, output
        assert f"tokenizer: {out / f'{name}.tokenizer.json'}" in output
    for name, ckpt in two_checkpoints.items():
        assert (out / f"{name}.tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").exists()

    args = ["--prompt", "Once upon a zebra", "-n", "6", "-t", "0", "--device", "cpu"]
    for name, ckpt in two_checkpoints.items():
        code, _, onnx_result = run("generate", out / f"{name}.onnx", *args)
        assert code == 0, onnx_result.output
        code, _, torch_result = run("generate", ckpt, *args)
        assert code == 0, torch_result.output
        assert onnx_result.stdout == torch_result.stdout, name


def test_export_without_tokenizer_does_not_borrow_one(two_checkpoints, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    assert run("export", two_checkpoints["a"], "-o", out / "m.onnx")[0] == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "manifest.json", "model.safetensors"):
        (bare / name).write_bytes((two_checkpoints["b"] / name).read_bytes())
    (out / "tokenizer.json").write_bytes((two_checkpoints["a"] / "tokenizer.json").read_bytes())  # a stray one
    code, output, _ = run("export", bare, "-o", out / "m.onnx", "--overwrite")
    assert code == 0 and "has no tokenizer.json" in output
    assert not (out / "m.tokenizer.json").exists()  # the previous export's tokenizer is gone with it
    code, output, _ = run("generate", out / "m.onnx", "--prompt", "x", "-n", "2")
    assert code == 2 and "exported without a tokenizer" in output and "--tokenizer" in output
    code, output, _ = run("generate", out / "m.onnx", "--prompt", "x", "-n", "2", "--tokenizer",
                          two_checkpoints["b"] / "tokenizer.json")
    assert code == 0, output
