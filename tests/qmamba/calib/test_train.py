"""Training: the fast training scan equals the reference, load balancing, schedule, data windows, the loop learns,
and the command line writes a loadable checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qmamba.calib.text_data import (RandomWindows, TrainingDataError, consecutive_windows, training_text_files,
                                    unigram_cross_entropy)
from qmamba.calib.train import (capture_router_logits, cosine_lr, init_model, load_balancing_loss, main,
                                next_token_loss, routing_fractions, train_loop)
from qmamba.calib.train_scan import fast_training_scan, selective_scan_train
from qmamba.config import ModelConfig, preset
from qmamba.kernels.selective_scan import selective_scan_ref
from qmamba.mamba_mixer import MambaMixer


def scan_inputs(batch=2, length=9, dim=6, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(u=r(batch, length, dim), delta=r(batch, length, dim), A=-torch.rand(dim, n, generator=g,
                dtype=torch.float64) * 3, B_ssm=r(batch, length, n), C_ssm=r(batch, length, n), D_skip=r(dim),
                z=r(batch, length, dim), delta_bias=r(dim), initial_state=r(batch, dim, n))


@pytest.mark.parametrize("with_state", [True, False])
def test_training_scan_equals_reference_values_and_gradients(with_state):
    args = scan_inputs()
    if not with_state:
        args["initial_state"] = None
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if v is not None}
    y_ref, h_ref = selective_scan_ref(**{**args, **leaves})
    (y_ref.pow(2).sum() + h_ref.sum()).backward()
    grads_ref = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    y, h = selective_scan_train(**{**args, **leaves})
    (y.pow(2).sum() + h.sum()).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, grads_ref[k], rtol=1e-4, atol=1e-4, msg=k)


def test_fast_training_scan_swaps_in_and_out():
    model = init_model(preset("tiny-blackmamba"), seed=1)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        with fast_training_scan(model):
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, MambaMixer))
            fast = model(ids)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, MambaMixer))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_bounds():
    uniform = torch.zeros(64, 4)
    uniform[torch.arange(64), torch.arange(64) % 4] = 1.0  # each expert wins a quarter of the tokens
    assert math.isclose(float(load_balancing_loss(uniform)), 1.0, rel_tol=0.05)
    collapsed = torch.zeros(64, 4)
    collapsed[:, 2] = 20.0
    assert math.isclose(float(load_balancing_loss(collapsed)), 4.0, rel_tol=1e-3)
    assert routing_fractions([collapsed]) == [0.0, 0.0, 1.0, 0.0]


def test_aux_loss_reaches_the_router():
    model = init_model(preset("tiny-blackmamba"), seed=2)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    with capture_router_logits(model) as captured:
        model(ids)
    assert set(captured) == {f"layers.{i}.mixer" for i in model.config.moe_layer_ids}
    aux = sum(load_balancing_loss(torch.cat(v)) for v in captured.values())
    aux.backward()
    router = model.layers[model.config.moe_layer_ids[0]].mixer.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 10, min_ratio=0.1) == pytest.approx(0.1)
    values = [cosine_lr(s, 100, 1.0, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_random_windows_are_shifted_targets():
    ids = torch.arange(1000)
    inputs, targets = next(RandomWindows(ids, batch=4, seq_len=16, seed=0))
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(targets, inputs + 1)
    again = next(RandomWindows(ids, batch=4, seq_len=16, seed=0))[0]
    assert torch.equal(inputs, again)
    with pytest.raises(TrainingDataError):
        RandomWindows(torch.arange(10), batch=1, seq_len=16)
    windows = consecutive_windows(ids, 10)
    assert windows.shape == (99, 11)
    assert torch.equal(windows[1, 0], windows[0, -1])


def test_unigram_baseline_matches_hand_count():
    train = torch.tensor([0, 0, 1, 2])
    got = unigram_cross_entropy(train, torch.tensor([0, 3]), vocab_size=4)
    probs = [3 / 8, 2 / 8, 2 / 8, 1 / 8]  # add-one counts 3, 2, 2, 1
    assert got == pytest.approx(-(math.log(probs[0]) + math.log(probs[3])) / 2)


def test_held_out_text_is_refused(tmp_path):
    with pytest.raises(TrainingDataError, match="train split"):
        training_text_files(["corpus:heldout"])
    held = tmp_path / "heldout"
    held.mkdir()
    (held / "x.txt").write_text("text")
    with pytest.raises(TrainingDataError, match="held-out"):
        training_text_files([str(held / "x.txt")])


def test_train_loop_learns_a_synthetic_task():
    """Sequences count up modulo a small period: a model that learns must beat the uniform loss by far."""
    cfg = ModelConfig(d_model=32, layers=["r", "2"], vocab_size=16, ffn_hidden=32, d_state=4, final_norm="layernorm")
    torch.manual_seed(0)
    model = init_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            start = torch.randint(0, 16, (8, 1), generator=gen)
            seq = (start + torch.arange(25)) % 16
            yield seq[:, :-1], seq[:, 1:]

    with fast_training_scan(model):
        history = train_loop(model, batches(), next_token_loss(0.01), steps=40, lr=1e-2, warmup=5, log_every=10,
                             progress=False)
    assert history[0]["ce"] > 1.5
    assert history[-1]["ce"] < 0.3 * history[0]["ce"]
    assert all(math.isfinite(r["aux"]) for r in history)


def test_command_line_writes_a_loadable_checkpoint(tmp_path):
    import qmamba

    text = tmp_path / "train.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log.\n\n" * 200, encoding="utf-8")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ModelConfig(d_model=32, layers=["r", "2"], vocab_size=320, ffn_hidden=32,
                                             d_state=4).to_dict()))
    out = tmp_path / "model"
    rc = main(["--config", str(config), "--data", str(text), "--eval-data", str(text), "--train-tokenizer", "300",
               "--steps", "3", "--batch", "2", "--seq-len", "16", "--eval-windows", "4", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    assert (out / "tokenizer.json").is_file()
    model = qmamba.load_model(out)
    report = model.checkpoint_manifest["training"]
    assert report["steps"] == 3 and math.isfinite(report["heldout"]["ppl"])
    assert set(report["routing_fractions"]) == {"layers.1.mixer"}
    assert main(["--config", str(config), "--data", str(text), "--tokenizer", str(out / "tokenizer.json"),
                 "--steps", "1", "--out", str(out)]) == 2  # refuses to overwrite
