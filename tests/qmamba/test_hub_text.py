"""``hub:NAME[,CONFIG][@SPLIT]`` text specs: the dataset's text column through the ``datasets`` package (a fake
module here: no network), cached once, default split by use (train for calibration, test for evaluation), and
one-line errors when the package is missing, the dataset cannot load or has no text."""

import sys
import types

import pytest

from qmamba import data_files
from qmamba.data_files import DataError, load_text_spec, parse_hub_spec, resolve_text_spec


class FakeDataset:
    def __init__(self, columns):
        self.columns = columns
        self.features = {name: types.SimpleNamespace(dtype="string") for name in columns}

    def __getitem__(self, name):
        return self.columns[name]


@pytest.fixture
def fake_datasets(monkeypatch, tmp_path):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub\nmore detail")
        if name == "numbers/only":
            return types.SimpleNamespace(features={"x": types.SimpleNamespace(dtype="int64")}, __getitem__=None)
        return FakeDataset({"text": [f"{split} line one", "", f"{split} line two"]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("QMAMBA_CACHE_DIR", str(tmp_path))
    return calls


def test_parse_hub_spec():
    assert parse_hub_spec("hub:Salesforce/wikitext,wikitext-2-raw-v1@test", "train") == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hub_spec("hub:user/name", "train") == ("user/name", None, "train")
    with pytest.raises(DataError, match="bad hub dataset spec"):
        parse_hub_spec("hub:", "train")


def test_hub_text_default_splits_and_cache(fake_datasets):
    text = load_text_spec("hub:user/corpus,cfg")  # evaluation: test split by default
    assert "test line one" in text and "test line two" in text
    assert fake_datasets == [("user/corpus", "cfg", "test")]
    load_text_spec("hub:user/corpus,cfg")  # cached: no second download
    assert len(fake_datasets) == 1
    [train] = resolve_text_spec("hub:user/corpus,cfg", "train")
    assert "train line one" in train.read_text() and fake_datasets[-1][2] == "train"


def test_calibration_reads_hub_train_split(fake_datasets):
    from qmamba.calib.data import load_calibration

    class CharTokenizer:
        def encode(self, text):
            return [ord(c) % 50 for c in text]

    data = load_calibration(["hub:user/corpus"], CharTokenizer(), nsamples=2, seq_len=8)
    assert tuple(data.ids.shape) == (2, 8)
    assert fake_datasets == [("user/corpus", None, "train")]


def test_hub_errors_are_one_line(fake_datasets, monkeypatch):
    with pytest.raises(DataError, match=r"cannot load hub dataset 'missing/set'.*doesn't exist on the Hub$"):
        load_text_spec("hub:missing/set")
    with pytest.raises(DataError, match="no text column"):
        load_text_spec("hub:numbers/only")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="need the `datasets` package"):
        data_files.hub_text_file("hub:other/set")
