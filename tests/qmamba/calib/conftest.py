"""Shared fixtures for the calibration tests: a small byte-level BPE tokenizer (vocab <= 512, trained on a slice
of the TRAIN corpus), a random tiny-blackmamba checkpoint carrying it, and its 1-bit PTB twin beside the float model."""

import pytest

from qmamba.data_files import read_text
from qmamba.testing import train_byte_bpe


def _train_tokenizer(path, text):
    train_byte_bpe(path, [text], vocab_size=400)


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory):
    from qmamba.data_files import corpus_files

    text = read_text(corpus_files("corpus:train/shakespeare")[0])[:60000]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, calib_text_file):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(path, calib_text_file.read_text(encoding="utf-8"))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    from qmamba.checkpoints.random_init import create_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    create_checkpoint("tiny-blackmamba", "qmamba", out, seed=0, dtype="float32", tokenizer_file=tiny_tokenizer)
    return out


@pytest.fixture(scope="module")
def ptb_pair(tiny_checkpoint, calib_text_file):
    """(PTB student, float teacher, calibration ids) built in memory: the 1-bit model before distillation."""
    import copy

    from qmamba.calib.data import load_calibration
    from qmamba.calib.pipeline import CalibOptions, calibrate
    from qmamba.calib.recipe import build_plan
    from qmamba.checkpoints.load import load_model
    from qmamba.quant.modules import swap_quantized_modules
    from qmamba.tokenizer import load_tokenizer

    teacher = load_model(tiny_checkpoint)
    student = copy.deepcopy(teacher)
    data = load_calibration([str(calib_text_file)], load_tokenizer(tiny_checkpoint / "tokenizer.json"), 16, 32, 0,
                            teacher.config.vocab_size)
    results = calibrate(student, data.ids, build_plan(student, bits=1), CalibOptions(progress=False))
    swap_quantized_modules(student, {n: r.fmt for n, r in results.items()}, {n: r.packed for n, r in results.items()})
    return student, teacher, data.ids
