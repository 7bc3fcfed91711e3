"""Router refit (``--refit-routers``, :mod:`qmamba.calib.route_fit`): on a synthetic drift of the router's inputs
it restores the float routing, without drift it leaves the router alone; in the calibration walk it keeps at least
the routing agreement of the same quantization without it on held-out tokens, and the CLI records it."""

import copy
import json
from pathlib import Path

import pytest
import torch

from qmamba.calib.data import load_calibration
from qmamba.calib.pipeline import CalibOptions, calibrate, float_router_logits
from qmamba.calib.quantize import QuantizeOptions, quantize_checkpoint
from qmamba.calib.recipe import build_plan
from qmamba.calib.route_fit import refit_router
from qmamba.calib.route_sensitivity import pick_route_sensitive, routing_sensitivity
from qmamba.checkpoints.detect import read_checkpoint
from qmamba.checkpoints.load import build_model
from qmamba.eval import record_routing, routing_agreement
from qmamba.tokenizer import load_tokenizer


def _router(d=16, e=8, seed=0):
    torch.manual_seed(seed)
    router = torch.nn.Linear(d, e, bias=True)
    return router


def test_refit_undoes_an_affine_drift_of_the_router_inputs():
    router = _router()
    original = copy.deepcopy(router)
    g = torch.Generator().manual_seed(1)
    x_f = torch.randn(4000, 16, generator=g)
    with torch.no_grad():
        target = router(x_f)
    drift, shift = torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g), 0.2 * torch.randn(16, generator=g)
    fit = refit_router(router, x_f @ drift + shift, target, ridge=1e-6)
    assert fit["refit"] and fit["before"] < 0.9
    assert fit["after"] > 0.999
    x_new = torch.randn(1000, 16, generator=g)  # unseen tokens with the same drift: the float routing comes back
    with torch.no_grad():
        agree = (router(x_new @ drift + shift).argmax(-1) == original(x_new).argmax(-1)).float().mean()
    assert agree > 0.99


def test_refit_without_drift_keeps_the_router():
    router = _router(seed=3)
    w0, b0 = router.weight.detach().clone(), router.bias.detach().clone()
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = router(x)
    fit = refit_router(router, x, target)
    assert fit["before"] == fit["after"] == 1.0
    torch.testing.assert_close(router.weight.detach(), w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(router.bias.detach(), b0, atol=1e-5, rtol=0)


def test_refit_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="target rows"):
        refit_router(_router(), torch.zeros(5, 16), torch.zeros(4, 8))


FIXTURE = Path(__file__).resolve().parents[3] / "qmamba" / "assets" / "tiny-blackmamba"


@pytest.fixture(scope="module")
def float_source(calib_text_file):
    """The shipped trained fixture (tiny-blackmamba, 4 experts; a random model's routing barely moves under int4),
    calibration and held-out ids from one text."""
    cfg, sd, _ = read_checkpoint(FIXTURE)
    ids = load_calibration([str(calib_text_file)], load_tokenizer(FIXTURE / "tokenizer.json"), 24, 128).ids
    return cfg, sd, ids[:16], ids[16:]  # calibration, held out


def _model(cfg, sd):
    return build_model(cfg, {k: v.clone() for k, v in sd.items()}, {}, "cpu", torch.float32)


def test_float_router_logits_match_the_routing_of_the_forward(float_source):
    cfg, sd, calib, _ = float_source
    model = _model(cfg, sd)
    logits = float_router_logits(model, calib, "cpu", batch_size=4)
    routes = record_routing(model, calib, batch_size=4)
    assert logits.keys() == routes.keys() == set(cfg.moe_layer_ids)
    for i in logits:
        assert torch.equal(logits[i].argmax(-1).to(torch.int16), routes[i])


def test_refit_keeps_more_routing_than_plain_rtn_on_held_out_tokens(float_source):
    cfg, sd, calib, held_out = float_source
    reference = record_routing(_model(cfg, sd), held_out, batch_size=4)
    agreement = {}
    for refit in (False, True):
        model = _model(cfg, sd)
        plan = build_plan(model, 4, 128, method="rtn")
        fits = {}
        calibrate(model, calib, plan, CalibOptions(progress=False, batch_size=4, refit_routers=refit),
                  router_fits=fits)
        assert bool(fits) == refit
        agreement[refit] = routing_agreement(reference, record_routing(model, held_out, batch_size=4))["overall"]
        if refit:
            assert all(f["after"] >= f["before"] for f in fits.values()), fits
    assert agreement[False] < 1.0  # the quantization moved some routing ...
    assert agreement[True] >= agreement[False]  # ... and the refit does not lose any of it on unseen tokens


def test_cli_option_records_the_refit(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from qmamba.cli import main

    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", str(tiny_checkpoint), "-o", str(out), "--method", "rtn",
                                       "--group-size", "32", "--refit-routers", "--nsamples", "4", "--seq-len",
                                       "32", "--report-tokens", "64", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "router refit" in result.output
    info = json.loads((out / "manifest.json").read_text())["quantization_info"]
    assert info["calibration"]["nsamples"] == 4 and set(info["router_refit"]) == {"1", "3"}  # tiny-blackmamba: MoE layers 1, 3


def test_refit_needs_an_moe_model(tmp_path):
    from qmamba.checkpoints.random_init import create_checkpoint
    from qmamba.errors import UserError

    src = tmp_path / "mamba"
    create_checkpoint("tiny-mamba", "qmamba", src, seed=0, dtype="float32")
    options = QuantizeOptions(method="rtn", calibration=CalibOptions(progress=False, refit_routers=True))
    with pytest.raises(UserError, match="MoE"):
        quantize_checkpoint(src, tmp_path / "q", options, log=lambda *_: None)


# ---- --route-aware: int8 for the matrices that move the routing most -----------------------------------------------
def test_pick_route_sensitive_ranks_by_drop_per_parameter_within_the_budget():
    agreement = {"a": 0.90, "b": 0.95, "c": 0.99, "d": 1.0}
    n_params = {"a": 400, "b": 100, "c": 100, "d": 10}
    # drop per parameter: b 5e-4, a 2.5e-4, c 1e-4; d moves nothing and is never picked
    assert pick_route_sensitive(agreement, n_params, 250) == ["b", "c"]  # a does not fit after b
    assert pick_route_sensitive(agreement, n_params, 600) == ["b", "a", "c"]
    assert pick_route_sensitive(agreement, n_params, 50) == []


def test_routing_sensitivity_restores_the_model_and_skips_modules_after_the_last_router(float_source):
    cfg, sd, calib, _ = float_source
    model = _model(cfg, sd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = build_plan(model, 4, 128, method="rtn")
    agreement = routing_sensitivity(model, calib[:4], plan, "cpu", batch_size=4)
    last = max(cfg.moe_layer_ids)
    assert set(agreement) == {n for n in plan if int(n.split(".")[1]) < last}
    assert all(0.0 <= a <= 1.0 for a in agreement.values()) and min(agreement.values()) < 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_route_aware_keeps_more_routing_than_plain_int4_on_held_out_tokens(float_source, calib_text_file,
                                                                             tmp_path):
    from qmamba.checkpoints.load import load_model

    cfg, sd, calib, held_out = float_source
    reference = record_routing(_model(cfg, sd), held_out, batch_size=4)
    agreement = {}
    for budget in (None, 0.06):
        out = tmp_path / f"q{budget}"
        info = quantize_checkpoint(FIXTURE, out, QuantizeOptions(
            method="rtn", calib=[str(calib_text_file)], nsamples=8, seq_len=128, route_aware=budget, report=False,
            report_tokens=512, calibration=CalibOptions(progress=False, batch_size=4)), log=lambda *_: None)
        model = load_model(out)
        agreement[budget] = routing_agreement(reference, record_routing(model, held_out, batch_size=4))["overall"]
        if budget:
            picked = info["route_aware"]["int8"]
            assert picked and all(n.startswith("layers.") for n in picked)
            manifest = json.loads((out / "manifest.json").read_text())["quantization"]
            assert all(manifest[n]["format"] == "int8" for n in picked)
    assert agreement[0.06] > agreement[None]


def test_route_aware_budget_needs_the_option(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from qmamba.cli import main

    result = CliRunner().invoke(main, ["quantize", str(tiny_checkpoint), "-o", str(tmp_path / "q"),
                                       "--route-aware-budget", "0.1"])
    assert result.exit_code != 0 and "only applies with --route-aware" in result.output
    assert not (tmp_path / "q").exists()
