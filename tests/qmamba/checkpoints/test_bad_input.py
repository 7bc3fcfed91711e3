"""Bad checkpoints and bad inputs give one clear error naming the key/file (library and CLI), run no code, and
write nothing."""

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from qmamba.checkpoints.detect import read_checkpoint
from qmamba.checkpoints.load import load_model
from qmamba.checkpoints.random_init import create_checkpoint
from qmamba.cli import main
from qmamba.errors import CheckpointError, ConfigError, TokenIdError, UserError


@pytest.fixture
def bm(tmp_path):
    return create_checkpoint("tiny-blackmamba", "blackmamba", tmp_path / "bm", seed=0)


def assert_cli_fails_cleanly(args, *fragments):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def snapshot(path):
    return sorted((p.relative_to(path), p.stat().st_size) for p in path.rglob("*"))


# ---- unreadable files ----------------------------------------------------------------------------------
def test_truncated_pickle(bm):
    data = (bm / "pytorch_model.bin").read_bytes()
    (bm / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_checkpoint(bm)
    assert_cli_fails_cleanly(["info", str(bm)], "pytorch_model.bin", "truncated")


def test_truncated_safetensors(tmp_path):
    path = create_checkpoint("tiny-mamba", "hf", tmp_path / "hf", seed=0)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)
    assert_cli_fails_cleanly(["info", str(path)], "model.safetensors")


class RunsCode:
    """A pickle payload that would run a shell command when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container,expected", [("torch_zip", "refusing"), ("pickle_protocol_2", "refusing"),
                                                ("pickle_protocol_4", "cannot read")])
def test_code_executing_pickle_is_refused(bm, tmp_path, container, expected):
    marker = tmp_path / "PWNED"
    payload = {"model": {"embedding.word_embeddings.weight": RunsCode(marker)}}
    if container == "torch_zip":
        torch.save(payload, bm / "pytorch_model.bin")
    else:
        with open(bm / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f, protocol=int(container[-1]))
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        load_model(bm)
    assert not marker.exists()
    assert expected in str(info.value)
    assert_cli_fails_cleanly(["info", str(bm)], "pytorch_model.bin", expected)
    assert not marker.exists()
    # the payload is real: an unsafe loader runs it (harmless here: it touches a file in tmp_path)
    if container == "torch_zip":
        torch.load(bm / "pytorch_model.bin", weights_only=False)
    else:
        with open(bm / "pytorch_model.bin", "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_pickle_without_model_key(bm):
    torch.save({"state": {}}, bm / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="'model'"):
        read_checkpoint(bm)


# ---- mismatching content ---------------------------------------------------------------------------------
def test_wrong_shape_names_key_and_file(bm):
    obj = torch.load(bm / "pytorch_model.bin", weights_only=True)
    obj["model"]["decoder.layers.2.mixer.x_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    torch.save(obj, bm / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.2\.mixer\.x_proj\.weight.*shape") as info:
        read_checkpoint(bm)
    assert str(bm / "pytorch_model.bin") in str(info.value)
    assert_cli_fails_cleanly(["info", str(bm)], "decoder.layers.2.mixer.x_proj.weight")


@pytest.mark.parametrize("change,fragment", [
    (lambda m: m.pop("decoder.layers.0.mixer.A_log"), "missing key 'decoder.layers.0.mixer.A_log'"),
    (lambda m: m.pop("decoder.layers.1.mixer.local_experts.3.linear_fc2.weight"),
     "missing key 'decoder.layers.1.mixer.local_experts.3.linear_fc2.weight'"),
    (lambda m: m.__setitem__("decoder.layers.0.mixer.extra.weight", torch.zeros(2)),
     "unexpected key 'decoder.layers.0.mixer.extra.weight'"),
    (lambda m: m.__setitem__("decoder.layers.1.mixer.local_experts.4.linear_fc1.weight", torch.zeros(2)),
     "unexpected key 'decoder.layers.1.mixer.local_experts.4.linear_fc1.weight'"),
    (lambda m: m.__setitem__("something.else", torch.zeros(2)), "unexpected key 'something.else'"),
])
def test_missing_and_unexpected_keys(bm, change, fragment):
    obj = torch.load(bm / "pytorch_model.bin", weights_only=True)
    change(obj["model"])
    torch.save(obj, bm / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(bm)
    assert fragment in str(info.value) and "pytorch_model.bin" in str(info.value)


@pytest.mark.parametrize("codes,fragment", [
    (["r", "4", "x", "4"], "unknown layer code 'x'"),
    (["r", "r4", "r", "4"], "'r4'"),
    (["r", "4", "r"], "num_layers"),
])
def test_bad_layer_plan(bm, codes, fragment):
    config = json.loads((bm / "config.json").read_text())
    config["mamba_moe_layers"] = codes
    (bm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=fragment):
        read_checkpoint(bm)
    assert_cli_fails_cleanly(["info", str(bm)], fragment.strip("'"))


def test_missing_config_key_named(bm):
    config = json.loads((bm / "config.json").read_text())
    del config["state_size"]
    (bm / "config.json").write_text(json.dumps(config))
    assert_cli_fails_cleanly(["info", str(bm)], "state_size", "config.json")


def test_not_a_checkpoint_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_cli_fails_cleanly(["info", str(tmp_path / "empty")], "not a checkpoint directory")
    assert_cli_fails_cleanly(["info", str(tmp_path / "nope")], "does not exist")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub"):
        load_model("qmamba-test-nobody/no-such-model")


def test_out_of_range_token_ids(bm):
    model = load_model(bm)
    for bad in (torch.tensor([[0, 1, model.config.vocab_size]]), torch.tensor([[-1, 2]])):
        with pytest.raises(TokenIdError, match="token ids"):
            model(bad)
    state = model.new_state(1)
    with pytest.raises(TokenIdError):
        model.step(torch.tensor([model.config.vocab_size + 5]), state)
    assert torch.count_nonzero(state.ssm_state) == 0  # nothing was written into the state
    with pytest.raises(TokenIdError):
        model(torch.tensor([[0.5]]))


# ---- the writers never leave partial output ------------------------------------------------------------
def test_create_errors_write_nothing(tmp_path):
    before = snapshot(tmp_path)
    assert_cli_fails_cleanly(["create", "--preset", "tiny-mamba", "--format", "blackmamba", "-o",
                              str(tmp_path / "x")], "blackmamba format")
    assert_cli_fails_cleanly(["create", "--preset", "tiny-blackmamba", "--format", "hf", "-o",
                              str(tmp_path / "y")], "MoE")
    assert_cli_fails_cleanly(["create", "--preset", "tiny-mamba", "-o", str(tmp_path / "z"), "--tokenizer",
                              str(tmp_path / "missing.json")], "tokenizer file not found")
    assert snapshot(tmp_path) == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("keep")
    assert_cli_fails_cleanly(["create", "--preset", "tiny-mamba", "-o", str(tmp_path / "full")], "not empty")
    assert (tmp_path / "full" / "a.txt").read_text() == "keep" and len(list((tmp_path / "full").iterdir())) == 1


def test_user_errors_are_one_type():
    assert issubclass(CheckpointError, UserError) and issubclass(ConfigError, UserError)


def test_hub_id_download_path_is_wired(tmp_path, monkeypatch):
    """The hub code path (no network here): snapshot_download is asked for configs and safetensors first, and
    for pickles only when the repository has no safetensors."""
    hub = pytest.importorskip("huggingface_hub")
    local = create_checkpoint("tiny-mamba", "mamba_ssm", tmp_path / "snapshot", seed=0)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, list(allow_patterns)))
        return str(local)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    model = load_model("someone/tiny-mamba")
    assert model.config.n_layers == 3 and model.checkpoint_manifest["format"] == "mamba_ssm"
    assert [c[0] for c in calls] == ["someone/tiny-mamba"] * 2
    assert "*.bin" not in calls[0][1] and "*.bin" in calls[1][1]
