"""Shared fixtures for the calibration tests: a small byte-level BPE tokenizer (vocab <= 512, trained on a slice
of the TRAIN corpus) and a random tiny-blackmamba checkpoint carrying it."""

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
