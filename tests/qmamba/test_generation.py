"""Sampling, the generation loop (EOS per sequence, batches, streaming, pluggable step) and the trained fixture."""

from __future__ import annotations

import math

import pytest
import torch

from qmamba.checkpoints.random_init import random_state_dict
from qmamba.config import preset
from qmamba.generation import (GenerationError, eager_step_fn, filter_logits, generate, generated_lengths,
                               make_generator, sample)
from qmamba.model import MambaLM


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny-blackmamba")
    m = MambaLM(cfg)
    sd = random_state_dict(cfg, seed=3)
    # larger-than-default weights so the random model's greedy choices differ between positions
    sd["embedding.weight"] = sd["embedding.weight"] * 50
    m.load_state_dict(sd, strict=False)
    return m.eval()


def prompts(batch, length, vocab=512, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- sampling ------------------------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=make_generator("cpu", 0)),
                       logits.argmax(-1))


def test_top_k_never_outside_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)).repeat(4000, 1)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = sample(logits, temperature=2.0, top_k=5, generator=make_generator("cpu", 1))
    assert set(drawn.tolist()) <= allowed
    assert len(set(drawn.tolist())) == 5  # a high temperature reaches all five


def nucleus_reference(probs: list[float], top_p: float) -> set[int]:
    """Smallest set of most likely tokens whose mass reaches top_p (plain Python)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.79, 0.81, 0.95, 0.999])
def test_top_p_keeps_the_nucleus(top_p):
    probs = [0.05, 0.5, 0.1, 0.3, 0.05]
    logits = torch.log(torch.tensor([probs]))
    kept = set(torch.isfinite(filter_logits(logits, top_p=top_p))[0].nonzero()[:, 0].tolist())
    assert kept == nucleus_reference(probs, top_p)
    drawn = sample(logits.repeat(3000, 1), temperature=1.0, top_p=top_p, generator=make_generator("cpu", 2))
    assert set(drawn.tolist()) == kept


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 40000
    drawn = sample(logits.repeat(n, 1), temperature=0.7, generator=make_generator("cpu", 5))
    freq = torch.bincount(drawn, minlength=4).double() / n
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    assert torch.allclose(freq, expected, atol=0.01)


def test_seed_reproducibility():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    a = sample(logits, 1.0, 50, 0.9, make_generator("cpu", 7))
    b = sample(logits, 1.0, 50, 0.9, make_generator("cpu", 7))
    c = torch.stack([sample(logits, 1.0, 50, 0.9, make_generator("cpu", s)) for s in range(8, 12)])
    assert torch.equal(a, b)
    assert not all(torch.equal(a, row) for row in c)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_options(kwargs):
    with pytest.raises(GenerationError):
        sample(torch.zeros(1, 4), **{"temperature": 1.0, **kwargs})


# ---- the loop ------------------------------------------------------------------------------------------------------
def test_eager_loop_logits_equal_parallel_forward(model):
    ids = prompts(2, 5)
    seen = []

    def recording_step(token_ids, state):
        logits = model.step(token_ids, state)
        seen.append(logits.clone())
        return logits

    out = generate(model, ids, 6, temperature=0.0, step_fn=recording_step)
    assert out.shape == (2, 11)
    full = model(out)
    for i, logits in enumerate(seen):  # step i consumed token L + i
        torch.testing.assert_close(logits, full[:, 5 + i], rtol=1e-4, atol=1e-4)
    # greedy: every generated token is the argmax of the parallel forward's logits at the previous position
    assert torch.equal(out[:, 5:], full[:, 4:-1].argmax(-1))


def test_batch_equals_single_sequences(model):
    ids = prompts(3, 4, seed=1)
    batched = generate(model, ids, 7, temperature=0.0)
    for b in range(3):
        assert torch.equal(batched[b:b + 1], generate(model, ids[b:b + 1], 7, temperature=0.0))


def test_sampled_generation_is_seeded(model):
    ids = prompts(2, 3, seed=2)
    a = generate(model, ids, 8, temperature=1.0, top_k=20, seed=11)
    b = generate(model, ids, 8, temperature=1.0, top_k=20, seed=11)
    assert torch.equal(a, b)


def test_stops_on_eos_per_sequence(model):
    ids = prompts(2, 4, seed=4)
    free = generate(model, ids, 10, temperature=0.0)  # no EOS
    new = free[:, 4:]
    eos = int(new[0, 2])
    first = [next((t for t in range(10) if int(new[b, t]) == eos), None) for b in range(2)]
    out = generate(model, ids, 10, temperature=0.0, eos_token_id=eos, pad_token_id=7)
    got = out[:, 4:]
    for b in range(2):
        stop = first[b]
        if stop is None:  # never hits EOS: identical to the free run (until the batch ends)
            assert torch.equal(got[b], new[b, :got.shape[1]])
        else:  # identical up to and including EOS, then padding
            assert torch.equal(got[b, :stop + 1], new[b, :stop + 1])
            assert (got[b, stop + 1:] == 7).all()
    expected_len = 10 if None in first else max(first) + 1
    assert got.shape[1] == expected_len
    lengths = generated_lengths(out, 4, eos)
    assert int(lengths[0]) == first[0] + 1


def test_generation_ends_when_all_sequences_finished(model):
    ids = prompts(1, 3, seed=5)
    first_token = int(generate(model, ids, 1, temperature=0.0)[0, -1])
    out = generate(model, ids, 50, temperature=0.0, eos_token_id=first_token, sync_every=1)
    assert out.shape == (1, 4)


def test_stream_callback_sees_every_token(model):
    ids = prompts(2, 3, seed=6)
    streamed = []
    out = generate(model, ids, 9, temperature=0.9, seed=1, stream=lambda t: streamed.append(t.clone()))
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 3:])


def test_default_step_fn_is_the_models_step(model):
    ids = prompts(1, 2)
    assert torch.equal(generate(model, ids, 5, temperature=0.0),
                       generate(model, ids, 5, temperature=0.0, step_fn=eager_step_fn(model)))


def test_step_fn_with_its_own_prefill(model):
    """A decoder object exposing ``prefill`` (as the CUDA-graph decoder does) supplies the state it then steps."""

    class Decoder:
        def __init__(self):
            self.state, self.steps = None, 0

        def prefill(self, input_ids):
            logits, self.state = model.prefill(input_ids)
            return logits, self.state

        def __call__(self, token_ids, state):
            assert state is self.state
            self.steps += 1
            return model.step(token_ids, state)

    ids = prompts(2, 3, seed=8)
    decoder = Decoder()
    out = generate(model, ids, 6, temperature=0.0, step_fn=decoder)
    assert decoder.steps == 5
    assert torch.equal(out, generate(model, ids, 6, temperature=0.0))


def test_bad_generation_inputs(model):
    with pytest.raises(GenerationError):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(GenerationError):
        generate(model, torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(GenerationError):
        generate(model, prompts(1, 2), -1)
    assert torch.equal(generate(model, prompts(1, 2), 0), prompts(1, 2))


# ---- the trained fixture -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_model():
    import qmamba
    from qmamba.assets import default_model_path

    return qmamba.load_model(default_model_path(), device="cpu")


def test_fixture_generates_deterministically(fixture_model):
    from qmamba.tokenizer import load_tokenizer

    tok = load_tokenizer(fixture_model.tokenizer_path)
    ids = torch.tensor([tok.encode("And the LORD said unto Moses,")])
    a = generate(fixture_model, ids, 20, temperature=0.0, eos_token_id=tok.eos_token_id)
    b = generate(fixture_model, ids, 20, temperature=0.0, eos_token_id=tok.eos_token_id)
    assert torch.equal(a, b)
    assert tok.decode(a[0, ids.shape[1]:].tolist()).strip()


def test_fixture_is_trained(fixture_model):
    """Next-token loss on a held-out passage is far below the uniform (log V) and near-unigram levels."""
    from qmamba.data_files import corpus_files, read_text
    from qmamba.tokenizer import load_tokenizer

    text = read_text(corpus_files("corpus:heldout/kjv")[0])[:4000]  # held-out text shipped with qmamba
    tok = load_tokenizer(fixture_model.tokenizer_path)
    ids = torch.tensor([tok.encode(text)[:512]])
    with torch.no_grad():
        logits = fixture_model(ids[:, :-1])
    loss = float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))
    assert loss < 0.6 * math.log(fixture_model.config.vocab_size), loss


# ---- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A random tiny-blackmamba checkpoint (fp32) carrying a 300-token byte-level BPE trained here."""
    from qmamba.calib.text_data import train_bpe_tokenizer
    from qmamba.checkpoints.random_init import create_checkpoint

    folder = tmp_path_factory.mktemp("cli")
    text = folder / "text.txt"
    text.write_text("Once upon a time there was a café in Zürich. " * 50, encoding="utf-8")
    train_bpe_tokenizer([text], 300, folder / "tokenizer.json")
    return create_checkpoint("tiny-blackmamba", "qmamba", folder / "ckpt", seed=1, dtype="float32",
                             tokenizer_file=folder / "tokenizer.json")


def test_cli_streams_the_greedy_continuation(cli_checkpoint):
    from click.testing import CliRunner

    import qmamba
    from qmamba.cli import main
    from qmamba.tokenizer import load_tokenizer

    prompt = "Once upon a time in Zürich"
    result = CliRunner().invoke(main, ["generate", str(cli_checkpoint), "--prompt", prompt, "-n", "12", "-t", "0",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(cli_checkpoint / "tokenizer.json")
    model = qmamba.load_model(cli_checkpoint)
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, 12, temperature=0.0, eos_token_id=tok.eos_token_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
    assert result.stdout == prompt + tok.decode(new) + "\n"
    assert "tokens/s" in result.stderr


def test_stream_generate_writes_what_generate_returns(cli_checkpoint):
    """The library loop both CLI backends use: the prompt, then the decoded continuation (EOS not printed), one
    timing line naming the backend; an empty prompt starts from the end-of-text token."""
    import io

    import qmamba
    from qmamba.generation import stream_generate
    from qmamba.tokenizer import load_tokenizer

    tok = load_tokenizer(cli_checkpoint / "tokenizer.json")
    model = qmamba.load_model(cli_checkpoint)
    for prompt in ("Once upon a time", ""):
        out, err = io.StringIO(), io.StringIO()
        stats = stream_generate(model, tok, prompt, 10, temperature=0.0, label="test backend", out=out, err=err)
        ids = torch.tensor([tok.encode(prompt) or [tok.eos_token_id]])
        tokens = generate(model, ids, 10, temperature=0.0, eos_token_id=tok.eos_token_id)
        n = int(generated_lengths(tokens, ids.shape[1], tok.eos_token_id)[0])  # up to and with the first EOS
        ref = tokens[0, ids.shape[1]:ids.shape[1] + n].tolist()
        assert out.getvalue() == prompt + tok.decode([t for t in ref if t != tok.eos_token_id]) + "\n"
        assert stats["prompt_tokens"] == ids.shape[1] and stats["new_tokens"] == len(ref)
        assert err.getvalue().startswith(f"{len(ref)} tokens in ") and "(test backend)" in err.getvalue()


def test_cli_errors_are_one_line(cli_checkpoint, tmp_path):
    from click.testing import CliRunner

    from qmamba.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "manifest.json", "model.safetensors"):
        (bare / name).write_bytes((cli_checkpoint / name).read_bytes())
    result = CliRunner().invoke(main, ["generate", str(bare), "--prompt", "x", "--device", "cpu"])
    assert result.exit_code == 2 and "tokenizer" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["generate", str(cli_checkpoint), "--prompt", "x", "--top-p", "0",
                                       "--device", "cpu"])
    assert result.exit_code == 2 and "--top-p" in result.stderr
