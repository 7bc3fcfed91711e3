"""Published checkpoint directories on a user's machine: BlackMamba (``pytorch_model.bin`` + Megatron config) and
state-spaces ``mamba_ssm`` directories hold no ``tokenizer.json``. With the GPT-NeoX-20B vocabulary they quantize
(RTN) and generate with no extra flag, through the NeoX tokenizer shipped with qmamba, and one stderr line says
so; the quantized output carries that tokenizer. An unknown vocabulary without a tokenizer is a clear one-line
error wherever text is needed (RTN, which needs none, still runs)."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import qmamba
from qmamba.checkpoints.random_init import create_checkpoint
from qmamba.cli import main
from qmamba.config import preset
from qmamba.generation import generate
from qmamba.tokenizer import NEOX_TOKENIZER_FILE, load_tokenizer

PUBLISHED = {"blackmamba": ("tiny-blackmamba", 50304), "mamba_ssm": ("tiny-mamba", 50280)}
PROMPT = "Hello world, this is"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def published_dir(root, fmt, vocab=None):
    name, neox_vocab = PUBLISHED[fmt]
    cfg = replace(preset(name), vocab_size=vocab or neox_vocab)
    out = create_checkpoint(cfg, fmt, root / f"{fmt}-{cfg.vocab_size}", seed=0)
    (out / "tokenizer.json").unlink(missing_ok=True)  # as published: weights and config only
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    return out


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def published(request, tmp_path_factory):
    return published_dir(tmp_path_factory.mktemp("published"), request.param)


def neox_notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "GPT-NeoX-20B" in line]


def test_rtn_quantizes_a_published_directory_with_no_extra_flag(published, tmp_path):
    out = tmp_path / "q4"
    result = invoke("quantize", published, "-o", out, "--bits", 4, "--method", "rtn", "--group-size", 32,
                    "--no-progress")
    assert result.exit_code == 0, result.output
    notices = neox_notices(result.stderr)
    assert len(notices) == 1 and str(NEOX_TOKENIZER_FILE) in notices[0] and str(published) in notices[0]
    assert (out / "tokenizer.json").read_bytes() == NEOX_TOKENIZER_FILE.read_bytes()  # the output carries it
    info = json.loads((out / "manifest.json").read_text())["quantization_info"]
    assert info["calibration"] is None and info["router_agreement"] is None  # RTN: no data, no report
    assert info["tokenizer"]["origin"] == "packaged"
    # the quantized model now has its own tokenizer: no notice any more
    result = invoke("generate", out, "--prompt", PROMPT, "-n", 3, "-t", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert neox_notices(result.stderr) == [] and result.stdout.startswith(PROMPT)


def test_generate_on_a_published_directory_uses_the_shipped_tokenizer(published):
    result = invoke("generate", published, "--prompt", PROMPT, "-n", 8, "-t", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(neox_notices(result.stderr)) == 1
    tok = load_tokenizer(NEOX_TOKENIZER_FILE)  # the reference: the same greedy tokens decoded with NeoX's
    model = qmamba.load_model(published)
    ids = torch.tensor([tok.encode(PROMPT)])
    new = [t for t in generate(model, ids, 8, temperature=0.0, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
           .tolist() if t != tok.eos_token_id]
    assert result.stdout == PROMPT + tok.decode(new) + "\n"


def test_unknown_vocabulary_without_tokenizer_is_a_clear_error(tmp_path):
    src = published_dir(tmp_path, "blackmamba", vocab=512)
    for args in (["generate", src, "--prompt", "x", "-n", 2, "--device", "cpu"],
                 ["eval", src, "--max-tokens", 64, "--no-progress"],
                 ["quantize", src, "-o", tmp_path / "gptq", "--method", "gptq", "--group-size", 32, "--no-progress"],
                 ["quantize", src, "-o", tmp_path / "report", "--method", "rtn", "--report", "--group-size", 32]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        message = result.output.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        assert "no tokenizer.json in" in message and "(512 tokens)" in message and "--tokenizer" in message
    assert not (tmp_path / "gptq").exists() and not (tmp_path / "report").exists()
    # RTN needs no text: it runs, says the output has no tokenizer, and writes none
    result = invoke("quantize", src, "-o", tmp_path / "rtn", "--method", "rtn", "--group-size", 32, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "no tokenizer.json" in result.output and not (tmp_path / "rtn" / "tokenizer.json").exists()


@pytest.mark.parametrize("fmt", ["qmamba", "blackmamba", "mamba_ssm", "hf"])
def test_create_carries_the_neox_tokenizer_only_for_the_neox_vocabulary(tmp_path, fmt):
    name = "tiny-blackmamba" if fmt in ("blackmamba", "qmamba") else "tiny-mamba"
    neox = create_checkpoint(replace(preset(name), vocab_size=50280), fmt, tmp_path / "neox", seed=0)
    assert (neox / "tokenizer.json").read_bytes() == NEOX_TOKENIZER_FILE.read_bytes()
    other = create_checkpoint(name, fmt, tmp_path / "other", seed=0)  # 512 tokens: NeoX's does not fit
    assert not (other / "tokenizer.json").exists()


def test_calibrated_output_carries_the_shipped_tokenizer(published, tmp_path):
    """GPTQ on a published directory: calibration text tokenized with the shipped NeoX tokenizer (one notice), and
    the output carries that tokenizer."""
    out = tmp_path / "gptq"
    result = invoke("quantize", published, "-o", out, "--method", "gptq", "--group-size", 32, "--nsamples", 2,
                    "--seq-len", 16, "--report-tokens", 16, "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(neox_notices(result.stderr)) == 1
    assert (out / "tokenizer.json").read_bytes() == NEOX_TOKENIZER_FILE.read_bytes()
    info = json.loads((out / "manifest.json").read_text())["quantization_info"]
    assert info["calibration"]["nsamples"] == 2 and info["tokenizer"]["origin"] == "packaged"


def test_explicit_tokenizer_wins_and_is_the_one_carried(tmp_path):
    from qmamba.assets import default_model_path

    src = published_dir(tmp_path, "blackmamba")
    own = default_model_path() / "tokenizer.json"  # 4096 tokens: fits the NeoX-sized vocabulary
    out = tmp_path / "q"
    result = invoke("quantize", src, "-o", out, "--method", "rtn", "--group-size", 32, "--tokenizer", own,
                    "--report", "--report-tokens", 16, "--seq-len", 16, "--no-progress")
    assert result.exit_code == 0, result.output
    assert neox_notices(result.stderr) == []  # the shipped NeoX tokenizer was not used
    assert (out / "tokenizer.json").read_bytes() == own.read_bytes()
    info = json.loads((out / "manifest.json").read_text())["quantization_info"]
    assert info["tokenizer"]["origin"] == "explicit" and info["report_data"]["nsamples"] == 1
