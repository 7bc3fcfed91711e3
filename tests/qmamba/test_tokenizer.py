"""Tokenizer loading and resolution (checkpoint's own, --tokenizer, the shipped GPT-NeoX-20B one, hub id, clear
errors), EOS detection, round trips and streaming decode (no split multi-byte characters)."""

from __future__ import annotations

import json
import random

import pytest

from qmamba.errors import UserError
from qmamba.tokenizer import (NEOX_TOKENIZER_FILE, IncrementalDecoder, TokenizerError, is_neox_vocab, load_tokenizer,
                              resolve_tokenizer)

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
    """The GPT-NeoX-20B tokenizer shipped in the package."""
    return NEOX_TOKENIZER_FILE


def test_shipped_neox_tokenizer_is_the_pinned_one(neox_file):
    import hashlib

    digest = hashlib.sha256(neox_file.read_bytes()).hexdigest()
    assert digest == "3cf430678137c8491ca82fb7092ee49e44ad38857fffe1e4a4a5ed860139a5b8"  # shared/data MANIFEST.json
    assert (neox_file.parent / "README.md").is_file()


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


def test_resolve_tokenizer_order(bpe_file, tmp_path):
    notes = []
    tok = resolve_tokenizer(bpe_file.parent, notice=notes.append)
    assert tok.path == bpe_file and tok.origin == "checkpoint"
    assert resolve_tokenizer(bpe_file.parent / "model.onnx", notice=notes.append).path == bpe_file  # file inside
    assert resolve_tokenizer(tmp_path, explicit=bpe_file, notice=notes.append).origin == "explicit"
    assert resolve_tokenizer(None, explicit=bpe_file.parent, notice=notes.append).path == bpe_file
    # the checkpoint's own tokenizer wins over the shipped NeoX one, even for the NeoX vocabulary
    assert resolve_tokenizer(bpe_file.parent, vocab_size=50304, notice=notes.append).path == bpe_file
    assert notes == []  # no notice unless the shipped tokenizer stands in
    with pytest.raises(TokenizerError, match="nope.json"):
        resolve_tokenizer(bpe_file.parent, explicit=tmp_path / "nope.json")
    with pytest.raises(UserError):
        resolve_tokenizer(None)


@pytest.mark.parametrize("vocab", [50277, 50280, 50304, 50432])
def test_neox_vocabulary_gets_the_shipped_tokenizer_with_a_notice(tmp_path, vocab, neox_file):
    notes = []
    tok = resolve_tokenizer(tmp_path, vocab_size=vocab, notice=notes.append)
    assert tok.path == neox_file and tok.origin == "packaged"
    assert tok.encode("Hello world") == [12092, 1533]
    assert len(notes) == 1 and "GPT-NeoX-20B" in notes[0] and str(neox_file) in notes[0] and str(tmp_path) in notes[0]


def test_neox_vocabulary_sizes():
    assert [v for v in range(50000, 51000) if is_neox_vocab(v)] == [*range(50277, 50305), 50432]
    assert not is_neox_vocab(None)


@pytest.mark.parametrize("vocab", [512, 50276, 50305, 65024])
def test_unknown_vocabulary_without_tokenizer_is_a_clear_error(tmp_path, vocab):
    with pytest.raises(TokenizerError) as info:
        resolve_tokenizer(tmp_path, vocab_size=vocab, notice=pytest.fail)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and f"({vocab} tokens)" in message
    assert "--tokenizer" in message


def test_tokenizer_larger_than_the_vocabulary_is_refused(bpe_file):
    with pytest.raises(TokenizerError, match="not this model's tokenizer"):
        resolve_tokenizer(bpe_file.parent, vocab_size=100)


def test_tokenizer_as_hub_id(tmp_path, monkeypatch, bpe_file):
    hub = pytest.importorskip("huggingface_hub")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(bpe_file)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)
    tok = resolve_tokenizer(None, explicit="someone/some-model")
    assert asked == [("someone/some-model", "tokenizer.json")] and tok.origin == "hub" and tok.path == bpe_file
    (tmp_path / "someone").mkdir()  # a local folder of that name: a missing local path, not a hub id
    with pytest.raises(TokenizerError, match="not found"):
        resolve_tokenizer(None, explicit="someone/some-model")
    assert len(asked) == 1


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
