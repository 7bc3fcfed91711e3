"""Decode step of BlackMamba-2.8B (preset, random weights) on the GPU: checked, then timed, for several launch
policies side by side in one run.

    python benchmarks/bench_decode.py --out decode.json [--formats bf16,int4_g128] [--batches 1,8]
        [--variants default,normp4] [--rounds 3]

For each format: (1) float32 copy of the model, greedy tokens of the CUDA-graph step (our kernels) against the
eager reference path (pure PyTorch), batch 1 and 8, ``--check-steps`` tokens: they must be equal; (2) bf16 model,
logits of the graph step against the eager reference step (relative error reported; must be finite);
(3) ms/token of graph replays for each policy variant (``--rounds N``: the variants timed in N interleaved rounds
after a warm-up, medians reported: compare variants that way, the first variant of a single round runs cold). Any
failed check exits non-zero (the figures are still written).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import re
import statistics
import sys
from pathlib import Path

import torch

from qmamba.bench import count_ties, recording_int8_inputs, same_codes_reference
from qmamba.config import preset
from qmamba.cuda_graph import GraphDecoder
from qmamba.kernels.decode_policy import DecodePolicy
from qmamba.kernels.matmul_configs import DEFAULT_POLICY, GEMV_MAX_M, MatmulPolicy, using_policy
from qmamba.kernels.weights import FMT_BINARY, FMT_FLOAT, FMT_INT8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import build, weight_bytes  # noqa: E402
from timing import require_idle_gpu  # noqa: E402


def greedy_reference(model, ids, state, steps):
    out = []
    tok = ids
    for _ in range(steps):
        tok = model.step(tok, state, check=False).float().argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


@contextlib.contextmanager
def int8_activations(model, on: bool, fc2: bool = False):
    """``model.int8_activations`` (what a checkpoint that passed ``qmamba quantize``'s int8 check loads with) and the
    reference experts' twin of it (``QuantExperts.int8_inputs``, ``int8_step_fc1``; ``int8_step_fc2`` with ``fc2``)
    set to ``on`` inside the block, restored after."""
    saved = getattr(model, "int8_activations", False), {m: (m.int8_inputs, m.int8_step_fc1, m.int8_step_fc2)
                                                        for m in model.modules() if hasattr(m, "int8_inputs")}
    model.int8_activations = on
    for m in saved[1]:
        m.int8_inputs = m.int8_step_fc1 = on
        m.int8_step_fc2 = on and fc2
    try:
        yield model
    finally:
        model.int8_activations = saved[0]
        for m, flags in saved[1].items():
            m.int8_inputs, m.int8_step_fc1, m.int8_step_fc2 = flags


def greedy_graph(decoder, ids, state, steps):
    out = []
    tok = ids
    for _ in range(steps):
        tok = decoder(tok, state).argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


def time_graph(decoder, batch, n=100):
    state = decoder.new_state(batch)
    entry = decoder._entry(batch)
    entry.ids.copy_(torch.randint(0, decoder.model.config.vocab_size, (batch,), device="cuda"))
    for _ in range(10):
        entry.graph.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            entry.graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    del state
    return statistics.median(times)


def int8_tie_check(model, prompt, state, got, tie_tolerance: float = 2e-3, fc2: bool = False):
    """A batched step with int8 activations (``DecodePolicy.int8_rows``) against its reference twin: the twin rounds
    the same values, but an input a rounding error away from a code's .5 boundary can round the other way in the
    other path and move the logits by a code's worth, so greedy runs may part at a near tie. Teacher-forced, as
    ``qmamba bench`` checks (:func:`qmamba.bench.check_decode`): the reference twin fed the graph's own tokens
    ``got [B, T]`` must pick each of them, except where its own top two logits are within ``tie_tolerance`` of its
    logit range. Returns the number of such ties, or None where a pick differs by more."""
    fed = torch.cat([prompt[:, -1:], got[:, :-1]], 1)
    with int8_activations(model, True, fc2):
        ref = _reference_steps(model, fed, state)
    return count_ties(ref, got, tie_tolerance)


def _reference_steps(model, fed, state):
    """The model's logits ``[B, T, V]`` fp32 fed ``fed [B, T]`` one step at a time from a copy of ``state``."""
    st = state.clone()
    return torch.stack([model.step(fed[:, t], st, check=False).float() for t in range(fed.shape[1])], 1)


def int8_same_codes_check(model, policy, prompt, state, got, tie_tolerance: float = 2e-3):
    """A batched step with int8 activations checked with the rounding taken out of the comparison: the eager fused
    step (the graph replays its kernels) fed the graph's tokens ``got [B, T]`` records fc1's int8 inputs
    (:func:`qmamba.bench.recording_int8_inputs`), and the reference twin, fed the same tokens, multiplies exactly
    those (:func:`qmamba.bench.same_codes_reference`, as ``qmamba bench`` does where its first check fails) instead
    of rounding its own x, whose last bits differ. Every top-1 of the step must then be the twin's, but for ties
    within ``tie_tolerance`` of its logit range. Returns ``(ties, steps the eager step's picks equal the graph's)``,
    or None where a pick differs by more."""
    from qmamba.fused_step import FusedDecodeStep

    fed = torch.cat([prompt[:, -1:], got[:, :-1]], 1)
    with int8_activations(model, True):
        step = FusedDecodeStep(model, policy)
        if not step.int8_rows_layers(fed.shape[0]):
            raise SystemExit(f"int8_same_codes_check: the step did not run int8 rows at batch {fed.shape[0]}")
        st, mine, codes = state.clone(), [], []
        with recording_int8_inputs(step, fed.shape[0]) as latest:
            for t in range(fed.shape[1]):
                mine.append(step(fed[:, t], st).float().clone())  # (a buffer)
                codes.append(latest())
        ref = same_codes_reference(model, fed, state, codes, policy)
    picks = torch.stack(mine, 1).argmax(-1)
    ties = count_ties(ref, picks, tie_tolerance)
    return None if ties is None else (ties, int((picks == got).all(0).sum()))


def _rounding(policy) -> tuple[bool, bool]:
    """``(int8 activations, fc2 too)``: what a policy's batched step rounds to int8 (``DecodePolicy.int8_rows``,
    ``int8_rows_fc2``), for its reference twin."""
    return bool(policy.int8_rows), bool(policy.int8_rows and policy.int8_rows_fc2)


@torch.no_grad()
def check_fp32(cfg, name, batches, steps, variants, log, failures):
    """Greedy tokens of the graph step under every policy variant against the eager reference path, float32 (with
    ``int8_rows``: against the reference twin that rounds as it does, ties at a code's rounding boundary allowed,
    :func:`int8_tie_check`)."""
    model = build(cfg, name, torch.float32)
    model.set_backend("reference")
    res = {}
    for batch in batches:
        prompt = torch.randint(0, cfg.vocab_size, (batch, 8), device="cuda")
        _, state = model.prefill(prompt)  # (8 rows: no int8 rounding either way)
        refs = {}
        for int8 in sorted({_rounding(p) for p in variants.values()}):  # the reference twin of each
            with int8_activations(model, *int8):
                refs[int8] = greedy_reference(model, prompt[:, -1], state.clone(), steps)
        model.set_backend("triton")
        for vname, policy in variants.items():
            ref = refs[_rounding(policy)]
            with int8_activations(model, *_rounding(policy)):
                decoder = GraphDecoder(model, policy=policy)
            with using_policy(matmul_variant(vname)):  # graphs capture the matmul policy active at capture
                got = greedy_graph(decoder, prompt[:, -1], state.clone(), steps)
            same = bool(torch.equal(ref, got))
            res[f"fp32_greedy_equal_b{batch}_{vname}"] = same
            verdict = "equal" if same else "DIFFER"
            if not same and policy.int8_rows:  # int8 codes round at .5: see int8_tie_check, int8_same_codes_check
                model.set_backend("reference")
                ties = int8_tie_check(model, prompt, state, got, fc2=_rounding(policy)[1])
                model.set_backend("triton")
                res[f"fp32_int8_ties_b{batch}_{vname}"] = ties
                same = ties is not None
                verdict = f"equal but for {ties} rounding-level ties (teacher-forced)" if same else "DIFFER"
                if not same:  # the twin fed the step's own int8 inputs
                    found = int8_same_codes_check(model, policy, prompt, state, got)
                    res[f"fp32_int8_same_codes_b{batch}_{vname}"] = found
                    same = found is not None
                    verdict = ("DIFFER" if not same else f"DIFFER from the rounding twin, but equal to the twin fed "
                               f"its own int8 inputs but for {found[0]} ties (teacher-forced; eager picks as the "
                               f"graph's at {found[1]} of {steps} steps)")
            log(f"{name:18s} fp32 greedy {steps} tokens batch {batch} {vname}: {verdict}")
            if not same:
                failures.append(f"{name} fp32 greedy batch {batch} {vname}: {ref.tolist()} vs {got.tolist()}")
            del decoder
        model.set_backend("reference")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


@torch.no_grad()
def run_format(cfg, name, batches, variants, log, failures, rounds: int = 1):
    model = build(cfg, name, torch.bfloat16)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = dict(format=name, weight_bytes=weight_bytes(model))
    # logits of one graph step against the eager reference step in bf16, batch 1: reported, not checked. On the
    # random-weight 2.8B model bf16 rounding alone moves one step's logits by 0.46 (bf16) to 1.4 (int4) relative
    # (session 11, the default paths; 1.6e-2 on tiny-blackmamba, where the bf16 reference is itself 1.4e-2 from
    # float32),
    # so the exact check is the float32 greedy one below; here only a non-finite logit fails.
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), device="cuda")
    model.set_backend("reference")
    _, state = model.prefill(prompt)
    ref = model.step(prompt[:, -1], state.clone(), check=False).float()
    model.set_backend("triton")
    got = GraphDecoder(model)(prompt[:, -1], state.clone()).float()
    err = ((got - ref).norm() / ref.norm()).item()
    res["bf16_logits_rel_err"] = err
    log(f"{name:18s} bf16 logits rel err vs reference (bf16 rounding, not a check): {err:.2e}")
    if not torch.isfinite(got).all():
        failures.append(f"{name} bf16 logits not finite")
    # rounds > 1: every variant timed once a round, in turn, after one untimed warm-up of the first (the first
    # variant of a run came out ~3% slow in session 21's calls 2 and 3: clocks and caches still warming); the
    # figure is the median over rounds, the spread (max - min) is logged beside it
    times = {}
    order = list(variants.items())
    for rnd in range(-1 if rounds > 1 else 0, rounds):
        for vname, policy in (order[:1] if rnd < 0 else order):
            with int8_activations(model, policy.int8_rows):  # (read as the step is built)
                decoder = GraphDecoder(model, policy=policy)
            for batch in batches:
                with using_policy(matmul_variant(vname)):
                    ms = time_graph(decoder, batch)
                if rnd >= 0:
                    times.setdefault((vname, batch), []).append(ms)
            del decoder
            gc.collect()
    for (vname, batch), ts in times.items():
        ms = statistics.median(ts)
        res[f"decode_ms_b{batch}_{vname}"] = ms
        spread = f" (median of {len(ts)} rounds, spread {max(ts) - min(ts):.3f})" if len(ts) > 1 else ""
        log(f"{name:18s} {vname:14s} batch {batch}: {ms:.3f} ms/token{spread}")
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    log(f"{name:18s} peak memory {res['peak_gb']:.2f} GB, weights {res['weight_bytes'] / 1e9:.2f} GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def policy_variant(base: DecodePolicy, v: str) -> DecodePolicy:
    """A named variant of the CUDA policy ``base`` (see ``--variants``); ``a+b``: variant a, then b on it (decode
    policy variants only: the general kernels' policy comes from one name, :func:`matmul_variant`)."""
    if "+" in v:
        for part in v.split("+"):
            if matmul_variant(part) is not DEFAULT_POLICY:
                raise SystemExit(f"policy variant {v!r}: {part!r} is the general kernels' and joins no other")
            base = policy_variant(base, part)
        return base
    if v == "default":
        return base
    if v == "nopdl":
        return dataclasses.replace(base, pdl=False)
    if matmul_variant(v) is not DEFAULT_POLICY:  # a variant of the general kernels' policy only
        return base
    if v == "xtile":  # int4 in_proj / fc1: the input read in the tile's shape (DecodePolicy.int4_x_in_tile)
        return dataclasses.replace(base, int4_x_in_tile=True)
    if v == "rt8":  # routed expert stacks on the decode kernels up to batch 8, one program row per input row on its
        #             own expert's tile (max_rows_routed, routed_row_programs)
        return dataclasses.replace(base, max_rows_routed=8, routed_row_programs=True)
    if v in ("xplanes", "xplanesb"):  # int4 in_proj / fc1 / head read the input planes add + norm writes
        #                               (DecodePolicy.int4_x_planes), in the tile's shape or (b) broadcast
        return dataclasses.replace(base, int4_x_planes=True, int4_x_in_tile=v == "xplanes")
    if v == "noxplanes":  # the int4 matrices read x itself (the CUDA policy before session 19)
        return dataclasses.replace(base, int4_x_planes=False)
    if v in ("xtilewide", "xtilewide0"):  # out_proj / fc2 read their input planes in the tile's shape at one row
        #                                  too (int4_x_in_tile_wide "always"), or never (0: not at batch 8's fc2)
        return dataclasses.replace(base, int4_x_in_tile_wide="always" if v == "xtilewide" else "off")
    if v in ("normgemv", "nonormgemv"):  # the add + norm between layers in the GEMVs around it at one row
        return dataclasses.replace(base, norm_in_gemvs=v == "normgemv")  # (DecodePolicy.norm_in_gemvs)
    if v == "normgemvbin":  # and so where a step has 1-bit weights (DecodePolicy.norm_in_gemvs_binary; session 26,
        #                     H200: 0.571 -> 0.576 ms/token, since when the 1-bit decode kernels changed)
        return dataclasses.replace(base, norm_in_gemvs=True, norm_in_gemvs_binary=True)
    if v.startswith("maxp"):  # e.g. maxp1056: twice the int4 / 1-bit rows a program for grids just past 1056 programs
        return dataclasses.replace(base, max_programs=int(v[4:]))
    if v.startswith("normp"):  # e.g. normp4: programs a row of each add + norm writing the int4 input planes
        return dataclasses.replace(base, norm_plane_programs=int(v[5:]))
    if v == "early":  # reads of what was written two launches back before the PDL wait (DecodePolicy.early_reads;
        #               the CUDA policy's since session 38)
        return dataclasses.replace(base, early_reads=True)
    if v == "late":  # those reads after the wait (the CUDA policy before session 38)
        return dataclasses.replace(base, early_reads=False)
    if v in ("pdlgen", "nopdlgen"):  # the general kernels of a batch-2+ step as programmatic dependents, or not
        #                             (DecodePolicy.pdl_general; the CUDA policy's since session 39)
        return dataclasses.replace(base, pdl_general=v == "pdlgen", general_early_tile=base.general_early_tile and
                                   v == "pdlgen")
    if v in ("etile", "noetile"):  # the dense int4 matrices' first weight tile before the wait, or not
        #                             (DecodePolicy.general_early_tile; the CUDA policy's since session 39)
        return dataclasses.replace(base, general_early_tile=v == "etile")
    if v in ("int8rows", "noint8rows"):  # a gated int4 fc1 at 2+ rows on the W4A8 row programs, its input rounded to
        #                                int8 per row by the add + norm (DecodePolicy.int8_rows; a model with int8
        #                                activations only: this bench turns them on for the variant)
        return dataclasses.replace(base, int8_rows=v == "int8rows")
    if v in ("int8fc2", "noint8fc2"):  # and fc2 on them too, its input quantized to int8 by a launch of its own
        #                              (DecodePolicy.int8_rows_fc2)
        return dataclasses.replace(base, int8_rows=base.int8_rows or v == "int8fc2", int8_rows_fc2=v == "int8fc2")
    if v.startswith("int8fc2bn"):  # e.g. int8fc2bn64: and fc2's weight rows a program
        return dataclasses.replace(base, int8_rows=True, int8_rows_fc2=True, int8_rows_fc2_block_n=int(v[9:]))
    if v.startswith("int8rowsbn"):  # e.g. int8rowsbn32: and fc1's weight rows a program
        return dataclasses.replace(base, int8_rows=True, int8_rows_block_n=int(v[10:]))
    if v in ("int8norm", "noint8norm"):  # the add + norm after an MoE layer ended by fc2's last program of a row,
        #                              not by a launch of its own (DecodePolicy.int8_rows_fc2_norm; session 49, on in
        #                              the CUDA policy since session 51)
        return dataclasses.replace(base, int8_rows=True, int8_rows_fc2=True, int8_rows_fc2_norm=v == "int8norm")
    m = re.fullmatch(r"int8(?:bn(\d+))?c(\d+)(?:fc2c(\d+)(?:bn(\d+))?)?", v)
    if m:  # e.g. int8c4: fc1's W4A8 row programs 4 tiles a step of the K loop (DecodePolicy.int8_rows_chunk), fc2
        #    not on them; int8c4fc2c8: and fc2 on them too, 8 tiles a step (int8_rows_fc2_chunk); ...bn16: 16 fc2 rows
        #    a program; int8bn32c4...: 32 fc1 rows a program. int8c1: the CUDA policy of session 47
        fc2 = m.group(3) is not None
        return dataclasses.replace(base, int8_rows=True, int8_rows_chunk=int(m.group(2)), int8_rows_fc2=fc2,
                                   int8_rows_fc2_chunk=int(m.group(3) or 1),
                                   int8_rows_block_n=int(m.group(1) or base.int8_rows_block_n),
                                   int8_rows_fc2_block_n=int(m.group(4) or base.int8_rows_fc2_block_n))
    if v == "dtrows0":  # the SSM update reads dt_proj's weight as stored (DecodePolicy.dt_rows_aligned off)
        return dataclasses.replace(base, dt_rows_aligned=False)
    if v == "joint":  # int4 input planes: every product of a row before any reduction (DecodePolicy.planes_joint)
        return dataclasses.replace(base, planes_joint=True, producer_word_sums=False)
    if v == "wsums":  # and the producers of the planes adding their word sums (DecodePolicy.producer_word_sums; the
        #               CUDA policy's at one row since session 37)
        return dataclasses.replace(base, planes_joint=True, producer_word_sums=True)
    if v == "nowsums":  # neither (the CUDA policy before session 37)
        return dataclasses.replace(base, planes_joint=False, producer_word_sums=False)
    if v == "jointng":  # the joint products for every matrix but a gated stack (DecodePolicy.planes_joint_gated
        #                 off: the CUDA policy's since session 38)
        return dataclasses.replace(base, planes_joint_gated=False)
    if v == "jointg":  # the joint products for a gated stack too (the CUDA policy in session 37)
        return dataclasses.replace(base, planes_joint_gated=True)
    if v == "nopieces":  # the CUDA policy before session 33: one padded tile row, 4 int4 rows a program
        return dataclasses.replace(base, int4_tile_pieces=False, block_n_int4=4)
    m = re.fullmatch(r"pieces(\d+)?", v)
    if m:  # int4 tile rows in two power-of-two pieces (DecodePolicy.int4_tile_pieces); e.g. pieces8: and 8 int4 rows
        #    a program where the matrix has them (fc1, the head)
        return dataclasses.replace(base, int4_tile_pieces=True,
                                   block_n_int4=int(m.group(1)) if m.group(1) else base.block_n_int4)
    if v.startswith("ssmbd"):  # e.g. ssmbd8: channels per program of the SSM update (DecodePolicy.ssm_block_d)
        return dataclasses.replace(base, ssm_block_d=int(v[5:]), ssm_block_d_batched=int(v[5:]))
    m = re.fullmatch(r"bin(\d+)(?:g(\d+))?(r8)?", v)
    if m:  # e.g. bin16g4: 1-bit weights on the decode kernels (the CUDA policy's "denorm" reading: bits as subnormal
        #    floats), 16 rows a program, 4 for the gated expert stacks (default: the same), batch 1 (r8: to batch 8)
        n = int(m.group(1))
        return dataclasses.replace(base, formats=tuple(f for f in base.formats if f != FMT_BINARY) + (FMT_BINARY,),
                                   block_n_binary=n, block_n_binary_gated=int(m.group(2) or n),
                                   binary_max_rows=8 if m.group(3) else 1)
    if v.startswith("fmts"):  # e.g. fmts+int8+binary: the default with these formats added to (-: taken from) the
        formats = list(base.formats)  # weight formats the decode kernels serve at batch 1
        for sign, name in re.findall(r"([+-])(\w+?)(?=[+-]|$)", v[4:]):
            fmt = {"int8": FMT_INT8, "binary": FMT_BINARY, "float": FMT_FLOAT}.get(name)
            if fmt is None:
                raise SystemExit(f"unknown format {name!r} in policy variant {v!r} (int8, binary, float)")
            formats = [f for f in formats if f != fmt] + ([fmt] if sign == "+" else [])
        return dataclasses.replace(base, formats=tuple(formats))
    if v.startswith("dec"):
        parts = v.split("_")[1:]
        bn = next((int(p[2:]) for p in parts if p.startswith("bn")), base.block_n_int4)
        unpack = next((p for p in parts if p in ("magic", "denorm")), "shift")
        mp = next((int(p[2:]) for p in parts if p.startswith("mp")), 0)
        return dataclasses.replace(base, formats=(0, 1, 2, 3), max_rows=1, int4_planes="planes" in parts,
                                   int4_unpack=unpack, block_n_int4=bn,
                                   min_programs=mp, expert_prefetch="noxp" not in parts,
                                   max_rows_planes=8 if "rows8" in parts else 1,
                                   planes_mma="nomma" not in parts and "rt8" not in parts,
                                   max_rows_routed=8 if "rt8" in parts else 0,
                                   pdl=base.pdl and "nopdl" not in parts)
    if v.startswith("bn"):
        i4, rest = v[2:].split("F")
        fl, w = rest.split("W")
        return dataclasses.replace(base, block_n_int4=int(i4), block_n_float=int(fl), num_warps=int(w))
    raise SystemExit(f"unknown policy variant {v!r}")


def matmul_variant(v: str) -> MatmulPolicy:
    """The general matmuls' policy of a variant (batch 2+ and the prefill run on them): :data:`DEFAULT_POLICY`
    itself but for ``intcodes`` (int4 plane codes through integer-to-float conversions,
    ``MatmulPolicy.plane_float_codes``), ``acqrel``, ``nowdots``, ``pairs``, ``pairss`` and ``nopairs``, whose policies
    :func:`policy_variant` leaves to this function."""
    if v == "intcodes":
        return dataclasses.replace(DEFAULT_POLICY, plane_float_codes=False)
    if v == "acqrel":  # the split-K atomic adds with Triton's default ordering (MatmulPolicy.split_k_atomic_sem)
        return dataclasses.replace(DEFAULT_POLICY, split_k_atomic_sem="acq_rel")
    if v in ("pairs", "pairss", "nopairs"):  # the small-M kernel's int4 plane codes two at a time
        #                                     (MatmulPolicy.plane_code_pairs "exact", the default, or s: "scaled"),
        #                                     or no: float codes (the default before session 34)
        return dataclasses.replace(DEFAULT_POLICY, plane_code_pairs={"pairs": "exact", "pairss": "scaled"}.get(v, ""))
    if v == "nowdots":  # 1-bit matrices at 8..16 rows without the bit-position dots (MatmulPolicy.
        #               binary_word_dots_min_rows): the word GEMV, one program row per input row, as before session 32
        return dataclasses.replace(DEFAULT_POLICY, binary_word_dots_min_rows=GEMV_MAX_M + 1)
    return DEFAULT_POLICY


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by the tests, against the invocations in scripts/gpu_pending.sh)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="blackmamba-2.8b")
    ap.add_argument("--formats", default="bf16,int8,int4_g128,binary+int4_g128")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the variants in this many interleaved rounds (after a warm-up) and report medians")
    ap.add_argument("--check-steps", type=int, default=16)
    # a variant with int4_planes (the CUDA default, "default", "dec_planes...") converts the model's int4 weights to
    # plane words in place (qmamba.quant.modules.use_plane_words); list stored-word variants ("dec", "dec_magic")
    # before them, since a converted model stays converted
    ap.add_argument("--variants", default="default,nopdl",
                    help="policy variants (a+b: a, then b on it): default, nopdl, intcodes (the general kernels' "
                         "int4 codes through "
                         "integer-to-float conversions: MatmulPolicy.plane_float_codes off), nowdots (1-bit matrices "
                         "at 8-16 rows on the word GEMV: MatmulPolicy.binary_word_dots_min_rows), xtile "
                         "(int4 input read in the tile's shape where the tile row is narrow: "
                         "DecodePolicy.int4_x_in_tile), pieces[N] (int4 tile rows in two power-of-two pieces: "
                         "DecodePolicy.int4_tile_pieces; N int4 rows a program), nopieces (one padded tile row, 4 int4 "
                         "rows a program: the CUDA policy before session 33), joint (every product of an int4 row "
                         "before any reduction: DecodePolicy.planes_joint, alone), wsums (joint, and the planes' "
                         "producers add their word sums: DecodePolicy.producer_word_sums; the CUDA policy's since "
                         "session 37), nowsums (neither: the CUDA policy before session 37), jointng (fc1 without "
                         "the joint products: DecodePolicy.planes_joint_gated off; the CUDA policy's since session "
                         "38), jointg (fc1 with them: the CUDA policy in session 37), early "
                         "(the SSM update's inputs and in_proj's conv operands read before the wait: "
                         "DecodePolicy.early_reads, the CUDA policy's since session 38), late (after it: the CUDA "
                         "policy before), pairs / pairss / nopairs "
                         "(the general kernels' int4 codes two at a time, exact (the default) / scaled, or float "
                         "codes: MatmulPolicy.plane_code_pairs), ssmbdN (N channels per "
                         "program of the SSM update, e.g. "
                         "ssmbd8), fmts[+-]FORMAT... (the default with int8, binary or float weights added to / "
                         "taken from those the decode kernels serve at batch 1, e.g. fmts+int8, fmts+binary), "
                         "dec[_planes][_magic|_denorm][_bnN][_mpP][_noxp][_rt8][_rows8[_nomma]] (the decode "
                         "kernels for every non-binary format at batch 1: int4 as stored words or plane words, nibbles "
                         "shifted or masked, N int4 rows per program, mpP: at least P "
                         "programs, noxp: fc2 waits for fc1 before reading its expert, rt8: routed experts on these "
                         "kernels up to batch 8 (CUDA cores, each routed row; dense matrices not), rows8: plane words "
                         "up to batch 8, tensor cores, or with nomma CUDA cores per row), "
                         "bnI<int4 block>F<float block>W<warps> e.g. bn16F4W4, xplanes / xplanesb (int4 input "
                         "planes read in the tile's shape / broadcast), noxplanes (none: x itself), "
                         "binN[gG][r8] (1-bit on the decode kernels, N rows a program, G for gated stacks, to "
                         "batch 8), "
                         "normgemv / nonormgemv (DecodePolicy.norm_in_gemvs), xtilewide / xtilewide0 "
                         "(int4_x_in_tile_wide always / off), maxpN (max_programs), normpN (norm_plane_programs), "
                         "acqrel (split-K adds with acq_rel ordering)")
    return ap


def main():
    args = build_parser().parse_args()
    require_idle_gpu()
    log = lambda s: print(s, flush=True)  # noqa: E731
    cfg = preset(args.preset)
    batches = [int(b) for b in args.batches.split(",")]
    base = DecodePolicy.for_device(torch.device("cuda"))
    variants = {v: policy_variant(base, v) for v in args.variants.split(",")}
    log(f"{torch.cuda.get_device_name(0)}; policy {base}")
    result = dict(preset=args.preset, device=torch.cuda.get_device_name(0), rows=[], failures=[])
    for name in args.formats.split(","):
        row = run_format(cfg, name, batches, variants, log, result["failures"], args.rounds)
        if args.check_steps:
            row.update(check_fp32(cfg, name, batches, args.check_steps, variants, log, result["failures"]))
        result["rows"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if result["failures"]:
        log("FAILED:\n  " + "\n  ".join(result["failures"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
