"""One reader, one builder: loading a checkpoint of any format parses its config.json once and builds one model
(the float model on ``meta`` that validates the tensors is the one that is filled), in ``load_model`` and in the
quantizer alike."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from qmamba.checkpoints.detect import open_checkpoint
from qmamba.checkpoints.load import load_model
from qmamba.checkpoints.random_init import create_checkpoint
from qmamba.errors import CheckpointError
from qmamba.model import MambaLM


@pytest.fixture
def counters(monkeypatch):
    """Counts of ``MambaLM`` constructions and of reads of each file name through ``Path.read_text``."""
    counts = {"models": 0, "reads": Counter()}
    init, read_text = MambaLM.__init__, Path.read_text

    def counting_init(self, *args, **kwargs):
        counts["models"] += 1
        init(self, *args, **kwargs)

    def counting_read_text(self, *args, **kwargs):
        counts["reads"][self.name] += 1
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(MambaLM, "__init__", counting_init)
    monkeypatch.setattr(Path, "read_text", counting_read_text)
    return counts


@pytest.mark.parametrize("preset,fmt", [("tiny-blackmamba", "qmamba"), ("tiny-blackmamba", "blackmamba"),
                                        ("tiny-mamba", "mamba_ssm"), ("tiny-mamba", "hf")])
def test_load_model_reads_the_config_once_and_builds_one_model(tmp_path, counters, preset, fmt):
    path = create_checkpoint(preset, fmt, tmp_path / fmt, seed=1)
    counters["models"], counters["reads"] = 0, Counter()
    model = load_model(path)
    assert counters["models"] == 1
    assert counters["reads"]["config.json"] == 1
    assert counters["reads"]["manifest.json"] == (1 if fmt == "qmamba" else 0)
    assert not any(t.is_meta for t in model.state_dict().values())


def test_open_checkpoint_validates_with_its_skeleton(tmp_path, counters):
    path = create_checkpoint("tiny-mamba", "hf", tmp_path / "hf", seed=0)
    counters["models"] = 0
    checkpoint = open_checkpoint(path)
    assert counters["models"] == 1 and isinstance(checkpoint.skeleton, MambaLM)
    assert checkpoint.format == "hf" and checkpoint.directory == path
    assert next(checkpoint.skeleton.parameters()).is_meta
    # a tensor of the wrong shape is caught by the validation, naming the key as the file spells it
    checkpoint.state_dict["layers.0.mixer.D"] = torch.zeros(3)
    checkpoint.skeleton = None
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.D"):
        checkpoint.validate()


def test_quantizer_builds_one_model(tmp_path, counters, monkeypatch):
    """Up to the writing of the result (whose validation builds its own skeleton for the output's config)."""
    import qmamba.checkpoints.native as native
    from qmamba.calib.pipeline import CalibOptions
    from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint

    save, built_before_save = native.save_checkpoint, []

    def counting_save(*args, **kwargs):
        built_before_save.append(counters["models"])
        return save(*args, **kwargs)

    monkeypatch.setattr(native, "save_checkpoint", counting_save)

    fixture = Path(__file__).resolve().parents[3] / "qmamba" / "assets" / "tiny-blackmamba"
    calib = tmp_path / "calib.txt"
    calib.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    counters["models"], counters["reads"] = 0, Counter()
    options = QuantizeOptions(bits=8, method="rtn", calib=[str(calib)], nsamples=2, seq_len=32,
                              calibration=CalibOptions(progress=False))
    quantize_checkpoint(fixture, tmp_path / "q", options, log=lambda *_: None)
    assert built_before_save == [1]
    assert counters["reads"]["config.json"] == 1
