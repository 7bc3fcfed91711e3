"""benchmarks/bench_decode.py's policy variants, the names behind the decode A/B figures of benchmarks/results.md:
each parses to the policy it documents (no GPU needed), an unknown name is refused."""

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from qmamba.kernels.decode_policy import DecodePolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_decode import policy_variant  # noqa: E402

CUDA = DecodePolicy.cuda(132, True)


def test_x_in_tile_wide_variants():
    assert CUDA.int4_x_in_tile_wide == "always"  # session 33
    assert policy_variant(dataclasses.replace(CUDA, int4_x_in_tile_wide="off"), "xtilewide").int4_x_in_tile_wide == \
        "always"
    assert policy_variant(CUDA, "xtilewide0").int4_x_in_tile_wide == "off"


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown policy variant"):
        policy_variant(CUDA, "xtilewidex")


def test_norm_gemv_and_atomic_variants():
    """``normgemv`` / ``nonormgemv`` (session 26: on in the CUDA policy) and ``acqrel`` (the general kernels' split-K
    adds with Triton's default ordering; relaxed is the default)."""
    from bench_decode import matmul_variant

    assert CUDA.norm_in_gemvs and not CUDA.norm_in_gemvs_binary
    assert not policy_variant(CUDA, "nonormgemv").norm_in_gemvs
    assert policy_variant(dataclasses.replace(CUDA, norm_in_gemvs=False), "normgemv").norm_in_gemvs
    assert matmul_variant("default").split_k_atomic_sem == "relaxed"
    assert not CUDA.norm_in_gemvs_binary and policy_variant(CUDA, "normgemvbin").norm_in_gemvs_binary
    assert policy_variant(dataclasses.replace(CUDA, norm_in_gemvs=False), "normgemvbin").norm_in_gemvs
    assert matmul_variant("acqrel").split_k_atomic_sem == "acq_rel"
    assert policy_variant(CUDA, "acqrel") == CUDA


def test_word_sums_variants():
    """The CUDA policy takes the producers' word sums with every product of a row before any reduction, at one row
    (session 37), but for the gated stack (session 38); ``nowsums`` is the policy before, ``joint`` the joint
    products alone, ``wsums`` both, ``jointg`` session 37's policy (fc1 joint too)."""
    assert CUDA.producer_word_sums and CUDA.planes_joint and not CUDA.planes_joint_batched
    assert not CUDA.planes_joint_gated and policy_variant(CUDA, "jointng") == CUDA
    before = policy_variant(CUDA, "nowsums")
    assert before == dataclasses.replace(CUDA, planes_joint=False, producer_word_sums=False)
    assert policy_variant(before, "wsums") == CUDA
    assert policy_variant(CUDA, "joint") == dataclasses.replace(CUDA, producer_word_sums=False)
    assert policy_variant(CUDA, "jointg") == dataclasses.replace(CUDA, planes_joint_gated=True)


def test_early_reads_variant():
    """``early``: reads of what was written two launches back moved before the wait (``DecodePolicy.early_reads``;
    on in the CUDA policy since session 38); ``late``: the policy before."""
    assert CUDA.early_reads and policy_variant(CUDA, "early") == CUDA
    assert policy_variant(CUDA, "late") == dataclasses.replace(CUDA, early_reads=False)


def test_dt_rows_variant():
    """``dtrows0``: the SSM update reads dt_proj's weight as stored (``DecodePolicy.dt_rows_aligned`` off; on in the
    CUDA policy), nothing else changed."""
    assert CUDA.dt_rows_aligned
    assert policy_variant(CUDA, "dtrows0") == dataclasses.replace(CUDA, dt_rows_aligned=False)


@pytest.mark.parametrize("skip,norms,expected_missing", [("default", 5, None), ("no_norm_all", 2, None),
                                                         ("no_norm_moe", 3, None), ("no_norm_mamba", 4, None),
                                                         ("no_xproj", 5, "x_proj"), ("no_fc2", 5, "fc2")])
def test_probe_phase_cost_skips_one_kind(skip, norms, expected_missing):
    """benchmarks/probe_phase_cost.py's step skips exactly the launches of its kind (tiny-blackmamba: 2 Mamba and 2
    MoE layers, 5 add + norms; the first and the last always run): counted on the CPU, kernels interpreted."""
    if os.environ.get("TRITON_INTERPRET") != "1":  # e.g. under scripts/gpu_check.sh: compiled kernels, CPU tensors
        pytest.skip("CPU tensors: runs with the Triton interpreter (scripts/test.sh)")
    import qmamba.fused_step as fs
    from probe_phase_cost import SkippingStep
    from qmamba.config import preset
    from qmamba.testing import random_model

    model = random_model(preset("tiny-blackmamba"), "cpu")
    policy = dataclasses.replace(DecodePolicy.for_device(torch.device("cpu")), norm_in_gemvs=False)
    step = SkippingStep(model, policy, skip)
    norm_calls, decoded = [], []
    real_norm, real_decode = fs.add_norm, fs.decode_linear
    fs.add_norm = lambda *a, **kw: (norm_calls.append(1), real_norm(*a, **kw))[1]
    fs.decode_linear = lambda x, w, out, **kw: (decoded.append(w), real_decode(x, w, out, **kw))[1]
    try:
        with torch.no_grad():
            step(torch.tensor([3]), model.new_state(1))
    finally:
        fs.add_norm, fs.decode_linear = real_norm, real_decode
    assert len(norm_calls) == norms
    kinds = {k: sum(any(getattr(p, k, None) is w for p in step.layers) for w in decoded)
             for k in ("x_proj", "fc2", "in_proj")}
    assert kinds["in_proj"] == 2
    assert kinds["x_proj"] == (0 if expected_missing == "x_proj" else 2)
    assert kinds["fc2"] == (0 if expected_missing == "fc2" else 2)


def _script_calls(script: Path, bench: str) -> list[list[str]]:
    """The argument lists of every ``benchmarks/<bench>`` invocation in a shell script (continuation lines joined,
    shell variables replaced by a placeholder)."""
    import re
    import shlex

    text = script.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or f"benchmarks/{bench}" not in line:
            continue
        args = shlex.split(line.split(f"benchmarks/{bench}", 1)[1])
        calls.append([re.sub(r"\$\{?\w+\}?", "X", a) for a in args])
    return calls


PENDING = Path(__file__).resolve().parents[2] / "scripts" / "gpu_pending.sh"


def test_pending_gpu_script_calls_parse():
    """scripts/gpu_pending.sh is the next GPU session's first call: every benchmark line in it must parse (session
    28's planned commands lacked bench_decode.py's required --out) and name only known variants, formats, presets and
    expert routes, so that no device minute is lost to a typo."""
    from bench_decode import build_parser
    from bench_e2e import FORMATS
    from qmamba.config import preset

    benches = ("bench_decode.py", "profile_prefill.py", "bench_matmul.py", "bench_w4a8.py")
    assert any(_script_calls(PENDING, b) for b in benches), "scripts/gpu_pending.sh runs no benchmark"
    for argv in _script_calls(PENDING, "bench_decode.py"):
        args = build_parser().parse_args(argv)
        preset(args.preset)
        for name in args.formats.split(","):
            assert name in FORMATS, f"unknown format {name!r} in {argv}"
        for v in args.variants.split(","):
            policy_variant(CUDA, v)
    import profile_prefill

    for argv in _script_calls(PENDING, "profile_prefill.py"):
        args = profile_prefill.build_parser().parse_args(argv)
        preset(args.preset)
        profile_prefill.expert_routes(args.experts)
    import bench_matmul

    for argv in _script_calls(PENDING, "bench_matmul.py"):
        args = bench_matmul.build_parser().parse_args(argv)
        assert set(filter(None, args.shapes.split(","))) <= set(bench_matmul.SHAPES)
        assert set(filter(None, args.peers.split(","))) <= set(bench_matmul.PEERS)
    import bench_w4a8

    for argv in _script_calls(PENDING, "bench_w4a8.py"):
        args = bench_w4a8.build_parser().parse_args(argv)
        assert set(args.shapes.split(",")) <= set(bench_w4a8.SHAPES)
        for tile in args.tiles.split(","):
            bench_w4a8.parse_tile(tile)


def test_pending_script_checks_can_fail():
    """The checks above can fail: a bench_decode.py line without --out, and an unknown expert route, are refused."""
    import profile_prefill
    from bench_decode import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--formats", "int4_g128", "--variants", "default,fold"])
    with pytest.raises(SystemExit, match="unknown expert route"):
        profile_prefill.expert_routes("tiles,per_expret")


def test_pending_script_lists_its_steps():
    """ALL_STEPS (what the step arguments are checked against) names the script's step lines, in order."""
    import re

    text = PENDING.read_text()
    listed = re.search(r'^ALL_STEPS="([^"]*)"', text, re.M).group(1).split()
    assert listed == re.findall(r"^step (\w+) ", text, re.M)


def test_ungated_route_and_expert_gemm_split():
    """profile_prefill.py's ``tiles_ungated`` route turns the gated epilogue off (on by default); its fc1 / fc2
    split takes the expert GEMM kernel's launches in turn (the MoE's fc1, fc2, ...)."""
    from bench_e2e import PREFILL_EXPERT_ROUTES
    from profile_prefill import expert_gemm_split

    assert PREFILL_EXPERT_ROUTES["tiles"].gemm_gated_act and not PREFILL_EXPERT_ROUTES["tiles_ungated"].gemm_gated_act
    split = expert_gemm_split([10.0, 4.0, 12.0, 5.0], 2)
    assert split == dict(layers=2, fc1_us=22.0, fc2_us=9.0)
    assert expert_gemm_split([10.0, 4.0, 12.0], 2) is None and expert_gemm_split([10.0, 4.0, 12.0, 5.0], 1) is None
    assert expert_gemm_split([], 0) is None


def test_int8_rows_variants():
    assert CUDA.int8_rows  # on since session 46 (6% faster at batch 8 on the H100, the same-codes check passed)
    assert policy_variant(CUDA, "int8rows").int8_rows and not policy_variant(CUDA, "noint8rows").int8_rows
    # session 46 (H100): level with fc1 alone on int8 (1.237-1.272 against 1.234); session 48, with both K loops
    # several tiles a step: 1.241 -> 1.001 ms/token at batch 8
    assert CUDA.int8_rows_fc2 and (CUDA.int8_rows_chunk, CUDA.int8_rows_fc2_chunk) == (4, 8)
    v = policy_variant(dataclasses.replace(CUDA, int8_rows=False, int8_rows_fc2=False), "int8fc2")
    assert v.int8_rows and v.int8_rows_fc2 and not policy_variant(CUDA, "noint8fc2").int8_rows_fc2
    v = policy_variant(CUDA, "int8fc2bn64")
    assert v.int8_rows_fc2 and v.int8_rows_fc2_block_n == 64
    v = policy_variant(CUDA, "int8rowsbn32")
    assert v.int8_rows and v.int8_rows_block_n == 32
    v = policy_variant(CUDA, "int8c4")  # fc1's K loop 4 tiles a step, fc2 not on int8 codes
    assert v.int8_rows and v.int8_rows_chunk == 4 and not v.int8_rows_fc2
    v = policy_variant(CUDA, "int8bn16c1")  # session 47's CUDA policy
    assert (v.int8_rows_block_n, v.int8_rows_chunk, v.int8_rows_fc2) == (16, 1, False)
    v = policy_variant(CUDA, "int8c2fc2c8bn16")
    assert (v.int8_rows_chunk, v.int8_rows_fc2, v.int8_rows_fc2_chunk, v.int8_rows_fc2_block_n) == (2, True, 8, 16)
    assert policy_variant(CUDA, "int8c1fc2c4").int8_rows_fc2_block_n == CUDA.int8_rows_fc2_block_n
    assert CUDA.int8_rows_fc2_norm  # session 51 (H100): 1.012 -> 1.004 ms/token at batch 8
    v = policy_variant(CUDA, "noint8norm")
    assert v.int8_rows_fc2 and not v.int8_rows_fc2_norm and policy_variant(v, "int8norm").int8_rows_fc2_norm
    v = policy_variant(CUDA, "noint8norm+int8c1")  # joined: each on the one before
    assert not v.int8_rows_fc2_norm and v.int8_rows_chunk == 1
    with pytest.raises(SystemExit):
        policy_variant(CUDA, "noint8norm+intcodes")  # a general kernels' variant joins no other


def _int8_twin_run(seed: int, steps: int):
    """A tiny int4 g128 BlackMamba, a 3 x 6 prompt, the state after it and the greedy tokens of its reference twin
    with int8 activations (``steps`` of them), for bench_decode's int8 checks."""
    from bench_decode import greedy_reference, int8_activations

    from qmamba.config import preset
    from qmamba.quant.formats import Int4Format
    from qmamba.testing import quantize_rtn, random_model

    torch.manual_seed(seed)
    model = quantize_rtn(random_model(preset("tiny-blackmamba"), "cpu"), Int4Format(128))
    prompt = torch.randint(0, model.config.vocab_size, (3, 6))
    _, state = model.prefill(prompt)
    with int8_activations(model, True):
        got = greedy_reference(model, prompt[:, -1], state.clone(), steps)
    return model, prompt, state, got


@torch.no_grad()
def test_int8_tie_check_passes_the_twin_and_fails_a_wrong_pick():
    """bench_decode's teacher-forced check of a step with int8 activations: the reference twin's own greedy tokens
    pass with no tie; a token the twin ranks far below its pick fails (None); the model's int8 flags are restored."""
    from bench_decode import int8_tie_check

    from qmamba.quant.modules import QuantExperts

    model, prompt, state, got = _int8_twin_run(0, 4)
    assert int8_tie_check(model, prompt, state, got) == 0
    bad = got.clone()
    ref = model.step(prompt[:, -1], state.clone(), check=False)  # (the step without rounding: the same low token)
    bad[1, 0] = ref[1].argmin()
    assert int8_tie_check(model, prompt, state, bad) is None
    assert not getattr(model, "int8_activations", False)
    assert not any(m.int8_inputs or m.int8_step_fc1 for m in model.modules() if isinstance(m, QuantExperts))


@torch.no_grad()
def test_int8_same_codes_check(monkeypatch):
    """bench_decode's check of int8 rows with the rounding taken out: the eager fused step's recorded fc1 inputs fed
    to the reference twin. The step's own picks pass (every recorded input consumed, the model's flags restored);
    records that are not what the step multiplied (zeros) fail; a step that ran no int8 rows is refused."""
    from bench_decode import int8_same_codes_check

    from qmamba.kernels import w4a8_gemm
    from qmamba.quant.modules import QuantExperts

    model, prompt, state, got = _int8_twin_run(1, 3)
    policy = dataclasses.replace(DecodePolicy.for_device(torch.device("cpu")), formats=(0, 1, 3), max_rows=1,
                                 max_rows_planes=1, max_rows_routed=8, int4_planes=True, int4_unpack="denorm",
                                 planes_mma=False, routed_row_programs=True, int4_x_planes=True, int8_rows=True)
    model.set_backend("triton")
    found = int8_same_codes_check(model, policy, prompt, state, got)
    assert found is not None and found[0] <= 1
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert all(m.int8_step_fc1_inputs is None and not m.int8_step_fc1 for m in experts)
    assert all(m.backend == "triton" for m in experts) and not model.int8_activations
    real = w4a8_gemm.dequantize_rows_int8  # (what the recorded codes are read back with)
    monkeypatch.setattr(w4a8_gemm, "dequantize_rows_int8", lambda *a: torch.zeros_like(real(*a)))
    assert int8_same_codes_check(model, policy, prompt, state, got) is None
    with pytest.raises(SystemExit, match="did not run int8 rows"):
        int8_same_codes_check(model, dataclasses.replace(policy, int8_rows=False), prompt, state, got)
