"""Tokenizer loading, EOS detection, round trips and streaming decode (no split multi-byte characters)."""

from __future__ import annotations

import json
import random

import pytest

from qmamba.errors import UserError
from qmamba.tokenizer import (IncrementalDecoder, TokenizerError, find_tokenizer_file, load_tokenizer)

TEXT = ("Hello, world! Naïve café — 東京 and emoji 🙂🚀 in one line.\n"
        "def f(x):\n    return x ** 2  # ünïcödé\n\nThe quick brown fox.")


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A small byte-level BPE trained here (independent of the shared data)."""
    from qmamba.calib.text_data import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text((TEXT + "\n\n") * 20 + "some more words to merge, words and more words\n" * 30,
                      encoding="utf-8")
    path = folder / "tokenizer.json"
    train_bpe_tokenizer([corpus], 320, path)
    return path


@pytest.fixture(scope="module")
def neox_file():
    from qmamba.data_files import DataError, find_data_dir

    try:
        path = find_data_dir() / "tokenizer" / "gpt-neox-20b.json"
    except DataError as exc:
        pytest.skip(str(exc))
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


def test_round_trip_and_eos(bpe_file):
    tok = load_tokenizer(bpe_file)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_id == 0  # <|endoftext|> is the first special token
    assert tok.vocab_size <= 320
    assert max(ids) < tok.vocab_size


def test_neox_tokenizer(neox_file):
    tok = load_tokenizer(neox_file)
    assert tok.encode("Hello world") == [12092, 1533]  # from the data README
    assert tok.eos_token_id == tok.tokenizer.token_to_id("<|endoftext|>") == 0
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_eos_from_tokenizer_config(bpe_file, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(bpe_file.read_bytes())
    tok = load_tokenizer(folder / "tokenizer.json")
    word = next(t for t in tok.tokenizer.get_vocab() if t.startswith("Ġ") and len(t) > 3)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": word}}))
    assert load_tokenizer(folder / "tokenizer.json").eos_token_id == tok.tokenizer.token_to_id(word)


def test_find_tokenizer_file(bpe_file, tmp_path):
    assert find_tokenizer_file(bpe_file.parent) == bpe_file
    assert find_tokenizer_file(bpe_file.parent / "model.onnx") == bpe_file  # a file inside the checkpoint dir
    assert find_tokenizer_file(tmp_path, explicit=bpe_file) == bpe_file
    assert find_tokenizer_file(None, explicit=bpe_file.parent) == bpe_file
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        find_tokenizer_file(tmp_path)
    with pytest.raises(TokenizerError, match="nope.json"):
        find_tokenizer_file(bpe_file.parent, explicit=tmp_path / "nope.json")
    with pytest.raises(UserError):
        find_tokenizer_file(None)


def test_unreadable_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")


def stream_pieces(tok, ids, chunk=1):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces, dec.flush()


@pytest.mark.parametrize("which", ["bpe", "neox"])
def test_streaming_decode_matches_full_decode(which, bpe_file, request):
    tok = load_tokenizer(bpe_file if which == "bpe" else request.getfixturevalue("neox_file"))
    ids = tok.encode(TEXT)
    for chunk in (1, 2, 5):
        pieces, rest = stream_pieces(tok, ids, chunk)
        assert "".join(pieces) + rest == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # never prints half a character


def test_streaming_random_ids_including_partial_bytes(bpe_file):
    tok = load_tokenizer(bpe_file)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(1, tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        pieces, rest = stream_pieces(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids)


def test_multibyte_character_is_held_back(bpe_file):
    tok = load_tokenizer(bpe_file)
    # the single-byte tokens of a 4-byte emoji: nothing printable until the last byte arrives
    byte_tokens = [tok.tokenizer.token_to_id(c) for c in "ðŁĻĤ"]  # byte-level spelling of U+1F642
    assert None not in byte_tokens
    dec = IncrementalDecoder(tok)
    assert [dec.push([t]) for t in byte_tokens] == ["", "", "", "🙂"]
    assert dec.flush() == ""
