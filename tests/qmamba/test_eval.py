"""Evaluation: sliding-window perplexity equals a brute-force computation written here; every token after the
first is scored once; LAMBADA greedy matching; router agreement; data path resolution; the eval CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from qmamba.config import preset
from qmamba.data_files import DataError, find_data_dir, resolve_text_spec
from qmamba.testing import train_byte_bpe
from qmamba.eval import _windows, lambada, perplexity, router_agreement
from qmamba.model import MambaLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MambaLM(preset("tiny-blackmamba"))
    for name, p in m.named_parameters():
        if "A_log" in name:
            p.data.uniform_(0, 1)
        else:
            p.data.normal_(0, 0.2)
    return m.eval()


def brute_force_nll(model, ids, seq_len, stride):
    """Token by token: the context of token p is ids[begin:p] for the window that scores it (HF convention)."""
    total, count, prev_end, begin = 0.0, 0, 0, 0
    n = ids.numel()
    while True:
        end = min(begin + seq_len, n)
        first = max(prev_end, begin + 1)
        with torch.no_grad():
            logits = model(ids[None, begin:end])[0]
        for p in range(first, end):
            total -= float(F.log_softmax(logits[p - begin - 1], -1)[ids[p]])
            count += 1
        prev_end = end
        if end >= n:
            break
        begin += stride
    return total, count


@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8), (16, 5), (40, 40)])
def test_perplexity_matches_brute_force(model, seq_len, stride):
    ids = torch.randint(0, model.config.vocab_size, (53,))
    res = perplexity(model, ids, seq_len, stride, batch_size=3, progress=False)
    total, count = brute_force_nll(model, ids, seq_len, stride)
    assert res["tokens"] == count
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("n,seq_len,stride", [(100, 10, 3), (37, 37, 37), (50, 64, 32), (1000, 128, 64)])
def test_windows_score_every_token_once(n, seq_len, stride):
    scored = []
    for begin, end, k in _windows(n, seq_len, stride):
        assert end - begin <= seq_len and k >= 0
        scored += list(range(end - k, end))
    overlapping = stride < seq_len
    if overlapping:
        assert sorted(scored) == list(range(1, n))
    else:  # non-overlapping windows: each window's first token has no context
        assert len(set(scored)) == len(scored)


def test_lambada_greedy_match(model):
    class CharTokenizer:  # the TextTokenizer interface: encode(text) -> list of ids
        def encode(self, text):
            return [ord(c) for c in text]

    tok = CharTokenizer()
    ctx = "abcdefgh"
    ids = torch.tensor([tok.encode(ctx)])
    # build the continuation the model predicts greedily, so the record must count as correct
    cont = []
    for _ in range(3):
        with torch.no_grad():
            nxt = int(model(torch.cat([ids, torch.tensor([cont], dtype=torch.long)], 1))[0, -1].argmax())
        cont.append(nxt)
    good = "".join(chr(c) for c in cont)
    wrong = "".join(chr((c + 1) % model.config.vocab_size) for c in cont)
    records = [{"context": ctx, "continuation": good}, {"context": ctx, "continuation": wrong}]
    res = lambada(model, tok, records, progress=False)
    assert res["accuracy"] == 0.5 and res["records"] == 2


def test_router_agreement(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    same = router_agreement(model, model, ids)
    assert same["overall"] == 1.0 and set(same["per_layer"]) == set(model.config.moe_layer_ids)
    other = MambaLM(model.config).eval()
    other.load_state_dict(model.state_dict())
    for i in model.config.moe_layer_ids:
        other.layers[i].mixer.router.bias.data[0] += 100.0  # everything to expert 0
    diff = router_agreement(model, other, ids)
    assert diff["overall"] < 1.0


def test_shipped_text_specs(tmp_path, monkeypatch):
    """corpus: specs read the text inside the package, wherever the full corpus is (here: nowhere)."""
    from qmamba.data_files import PACKAGED_DATA_DIR, lambada_path, load_text_spec

    monkeypatch.setenv("QMAMBA_DATA_DIR", str(tmp_path / "nowhere"))
    files = resolve_text_spec("corpus:heldout")
    assert [f.name for f in files] == ["kjv.txt.xz", "pydocs.txt.xz", "shakespeare.txt.xz"]
    assert all(PACKAGED_DATA_DIR in f.parents for f in files)
    assert [f.name for f in resolve_text_spec("corpus:train")] == ["jargon.txt.xz", "kjv.txt.xz", "pydocs.txt.xz",
                                                                   "shakespeare.txt.xz"]
    assert "Jesus Christ" in load_text_spec("corpus:heldout/kjv")  # 1 John .. Revelation
    assert PACKAGED_DATA_DIR in lambada_path().parents
    with pytest.raises(DataError, match="no corpus file"):
        resolve_text_spec("corpus:heldout/nothing")
    with pytest.raises(DataError, match="split"):
        resolve_text_spec("corpus:test")
    with pytest.raises(DataError, match="QMAMBA_DATA_DIR"):
        resolve_text_spec("full:heldout")
    with pytest.raises(DataError, match="QMAMBA_DATA_DIR"):
        find_data_dir()


def test_full_corpus_lookup_in_a_checkout_and_in_an_installed_package(tmp_path, monkeypatch):
    """From a checkout, ../shared/data beside it is found and named in the error; an installed package (no
    pyproject.toml above it) looks at no folder beside site-packages and says QMAMBA_DATA_DIR is not set."""
    import qmamba.data_files as data_files

    monkeypatch.delenv("QMAMBA_DATA_DIR", raising=False)
    checkout = tmp_path / "work" / "repo"
    checkout.mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(data_files, "CHECKOUT", checkout)
    with pytest.raises(DataError) as exc:
        find_data_dir()
    assert str(tmp_path / "work" / "shared" / "data") in str(exc.value)
    (tmp_path / "work" / "shared" / "data" / "corpus").mkdir(parents=True)
    assert find_data_dir() == tmp_path / "work" / "shared" / "data"

    installed = tmp_path / "venv" / "site-packages"
    (installed.parent / "shared" / "data" / "corpus").mkdir(parents=True)  # not a place an install looks at
    monkeypatch.setattr(data_files, "CHECKOUT", installed)
    with pytest.raises(DataError) as exc:
        find_data_dir()
    message = str(exc.value)
    assert "QMAMBA_DATA_DIR is not set" in message and "shared" not in message and "looked at" not in message
    monkeypatch.setenv("QMAMBA_DATA_DIR", str(tmp_path / "work" / "shared" / "data"))
    assert find_data_dir() == tmp_path / "work" / "shared" / "data"


def test_shipped_heldout_and_lambada_equal_the_full_corpus():
    """The held-out files and LAMBADA shipped are exact copies of the full corpus's; the train files are slices."""
    import hashlib

    try:
        full = find_data_dir()
    except DataError as exc:
        pytest.skip(f"needs the full corpus: {exc}")
    from qmamba.data_files import PACKAGED_DATA_DIR, load_text_spec

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for rel in ["corpus/heldout/kjv.txt.xz", "corpus/heldout/pydocs.txt.xz", "corpus/heldout/shakespeare.txt.xz",
                "eval/lambada_openai.jsonl.gz"]:
        assert digest(PACKAGED_DATA_DIR / rel) == digest(full / rel), rel
    for name in ("shakespeare", "kjv", "pydocs", "jargon"):
        shipped, whole = load_text_spec(f"corpus:train/{name}"), load_text_spec(f"full:train/{name}")
        pieces = shipped.strip("\n").split("\n\n")
        assert all(piece in whole for piece in pieces) and len(shipped) < len(whole) / 4


def test_eval_cli(tmp_path):
    from qmamba.checkpoints.random_init import create_checkpoint
    from qmamba.cli import main
    train_byte_bpe(tmp_path / "tokenizer.json", ["the quick brown fox jumps over the lazy dog " * 50])
    ckpt = tmp_path / "m"
    create_checkpoint("tiny-blackmamba", "qmamba", ckpt, tokenizer_file=tmp_path / "tokenizer.json")
    text = tmp_path / "t.txt"
    text.write_text("the lazy dog jumps over the quick brown fox. " * 20)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--data", str(text), "--seq-len", "32", "--json", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["perplexity"]["tokens"] > 0 and res["perplexity"]["ppl"] > 1
    r = CliRunner().invoke(main, ["eval", "--compare", str(ckpt), str(ckpt), "--data", str(text), "--seq-len", "32",
                                  "--no-progress"])
    assert r.exit_code == 0 and "+0.0000 (+0.00%)" in r.output and "100.00%" in r.output
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--data", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "not found" in r.output
    r = CliRunner().invoke(main, ["eval"])
    assert r.exit_code == 2
