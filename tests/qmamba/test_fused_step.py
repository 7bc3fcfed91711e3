"""The fused decode step and the Triton backend against the reference model: float, int8, int4 and 1-bit weights
(1-bit projections and experts, int4 x_proj/dt_proj/head), BlackMamba (MoE) and plain Mamba; decode steps equal
the prefill path; graph replay equals eager (GPU only)."""

import copy
import dataclasses

import pytest
import torch

from qmamba import fused_step as fused_step_module
from qmamba.config import preset
from qmamba.fused_step import FusedDecodeStep
from qmamba.kernels.decode_policy import DecodePolicy
from qmamba.testing import assert_prefill_and_step_match, quantize_rtn, random_model
from qmamba.kernels.weights import BinaryWeight
from qmamba.quant.binary import BinaryFormat
from qmamba.quant.formats import Int4Format, Int8Format

FORMATS = {"float": None, "int8": Int8Format(), "int4": Int4Format(32), "int4g128": Int4Format(128),
           "binary": (BinaryFormat(), Int4Format(32))}


def assert_steps_match(step, model, tok, state, ref_state, steps: int = 2):
    """``steps`` greedy steps of the fused step against the model's own step on a copy of the state: the logits, then
    the carried SSM and conv states (the workspace re-zeroed, the state carried from step to step)."""
    for _ in range(steps):
        logits = step(tok, state)
        ref = model.step(tok, ref_state)
        torch.testing.assert_close(logits, ref.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.conv_state, ref_state.conv_state, atol=1e-4, rtol=1e-4)
        tok = ref.argmax(-1)


def build(name, fmt, device):
    model = random_model(preset(name), device)
    if isinstance(fmt, tuple):
        return quantize_rtn(model, fmt[0], sensitive_fmt=fmt[1])
    return quantize_rtn(model, fmt) if fmt is not None else model


@pytest.mark.parametrize("fmt,batch,kernels", [("float", 2, "decode"), ("int8", 2, "decode"), ("int4", 2, "decode"),
                                               ("int4", 1, "decode"), ("binary", 1, "decode"), ("binary", 2, "decode"),
                                               ("binary", 1, "decode_denorm"), ("binary", 3, "decode_denorm"),
                                               ("int4g128", 1, "decode_ssm8"), ("float", 3, "decode_ssm8"),
                                               ("float", 2, "decode_dtrows0"), ("int4g128", 1, "decode_ssm8_dtrows0"),
                                               ("binary", 1, "general"),
                                               ("float", 1, "general"), ("int4", 1, "general"),
                                               ("int8", 3, "general"), ("int4g128", 1, "planes"),
                                               ("int4g128", 2, "planes_magic"), ("int4g128", 1, "planes_denorm"),
                                               ("int4g128", 3, "routed_denorm"), ("float", 3, "routed"),
                                               ("int4g128", 4, "routed_denorm_rowprog"), ("float", 3, "routed_rowprog"),
                                               ("int4g128", 3, "routed_denorm_rowprog_xplanes"),
                                               ("int4g128", 1, "planes_denorm_xplanes"),
                                               ("int4g128", 1, "planes_denorm_xplanes_joint"),
                                               ("int4g128", 3, "routed_denorm_rowprog_xplanes_joint"),
                                               ("int4g128", 1, "planes_denorm_xplanes_bcast")])
@torch.no_grad()
def test_fused_step_matches_model_step(fmt, batch, kernels, device):
    """``decode``: the decode-linear kernels for float / int8 / int4 / 1-bit (conv fused into in_proj's epilogue,
    activation into fc1; ``_denorm``: 1-bit signs read as subnormal floats; ``_dtrows0``: the SSM update on
    dt_proj's weight as stored, not through ``aligned_rows``); ``general``: the general matmul
    kernels (GEMV word kernels, the 1-bit kernels, small-M
    tiles, split-K into the zeroed workspace, conv and activation on their own); ``planes``: the decode kernels on the int4
    weights converted in place to plane words (``_magic`` / ``_denorm``: nibbles masked in place, see
    ``DecodePolicy.int4_unpack``; ``_xplanes``: their input as the int4 input planes add + norm writes,
    ``DecodePolicy.int4_x_planes``, read in the tile's shape or, ``_bcast``, broadcast); ``routed``: only the routed expert stacks on the decode kernels at 2+ rows (each
    routed row on CUDA cores), dense matrices on the general kernels; ``_rowprog``: one program row per routed row,
    on its own expert's tile (``DecodePolicy.routed_row_programs``); ``_xplanes``: fc1's row programs read the int4
    input planes of x; ``_joint``: with the tile pieces and every product before any reduction
    (``DecodePolicy.int4_tile_pieces``, ``planes_joint``; the other ``planes`` / ``routed`` cases without it)."""
    model = build("tiny-blackmamba", FORMATS[fmt], device)
    if fmt == "binary":
        from qmamba.quant.binary import BinaryExperts, BinaryLinear

        kinds = {type(m) for m in model.modules()}
        assert BinaryLinear in kinds and BinaryExperts in kinds
    ids = torch.randint(0, model.config.vocab_size, (batch, 5), device=device)
    _, state = model.prefill(ids)
    ref_state = state.clone()
    tok = ids[:, 2]  # a strided column, as generation loops pass it
    policy = DecodePolicy.for_device(device)
    if kernels.startswith("decode"):  # every format on these kernels, whatever the device's default lists
        policy = dataclasses.replace(policy, formats=DecodePolicy().formats,  # (CUDA: not int4 stored words)
                                     int4_x_planes=False)  # the input planes: the "_xplanes" cases
        if kernels.startswith("decode_ssm8"):  # 8 channels per program of the SSM update (DecodePolicy.ssm_block_d)
            policy = dataclasses.replace(policy, ssm_block_d=8, ssm_block_d_batched=8)
        if kernels.endswith("dtrows0"):  # dt_proj's weight as stored (rank 4), not padded to 16-element rows
            policy = dataclasses.replace(policy, dt_rows_aligned=False)
        if kernels == "decode_denorm":  # 1-bit bits (and int4 codes) read as subnormal floats, as the CUDA policy
            policy = dataclasses.replace(policy, int4_unpack="denorm")
    elif kernels == "general":
        policy = dataclasses.replace(policy, formats=(), int4_x_planes=False)
    elif kernels.startswith("planes"):
        unpack = kernels.split("_")[1] if "_" in kernels else "shift"
        policy = dataclasses.replace(policy, formats=(0, 1, 3), max_rows=8, int4_planes=True, int4_unpack=unpack,
                                     int4_x_planes="xplanes" in kernels, int4_x_in_tile="bcast" not in kernels)
    elif kernels.startswith("routed"):
        parts = kernels.split("_")
        unpack = next((u for u in parts if u in ("denorm", "magic")), "shift")
        policy = dataclasses.replace(policy, formats=(0, 1, 3), max_rows=1, max_rows_planes=1, max_rows_routed=8,
                                     int4_planes=True, int4_unpack=unpack, planes_mma=False,
                                     routed_row_programs="rowprog" in parts,
                                     int4_x_planes="xplanes" in parts)
    if kernels.endswith("_joint"):  # in the routed row programs too (the CUDA policy joins them at one row only)
        policy = dataclasses.replace(policy, int4_tile_pieces=True, planes_joint=True, planes_joint_batched=True)
    elif kernels.startswith(("planes", "routed")):  # each piece reduced before the next (CUDA: joint since 37)
        policy = dataclasses.replace(policy, planes_joint=False)
    step = FusedDecodeStep(model, policy)
    dt_strides = {p.dt_w.stride(0) for p in step.layers if hasattr(p, "dt_w")}  # rank 4: padded to 16 by default
    assert dt_strides == ({16} if policy.dt_rows_aligned else {model.config.dt_rank})
    if fmt == "binary":  # the 1-bit matrices take the decode kernels exactly when the policy lists the format
        binary = [w for w in step._weights() if isinstance(w, BinaryWeight)]
        want = kernels.startswith("decode") and batch <= policy.max_rows  # (the CUDA policy: one row at most)
        assert binary and all(policy.takes(w, batch) == want for w in binary)
    if kernels.startswith("routed"):  # the experts take the decode kernels at this batch, dense matrices do not
        moe = [p for p in step.layers if hasattr(p, "fc1")]
        assert moe and all(policy.takes(p.fc1, batch, routed=True) and not policy.takes(p.fc1, batch) for p in moe)
        mamba = [p for p in step.layers if hasattr(p, "x_proj")]
        assert mamba and not any(policy.takes(p.x_proj, batch) for p in mamba)
    if kernels.startswith("planes"):  # the model's int4 weights now hold plane words; the reference reads them too
        assert any(getattr(m, "_plane_words", False) for m in model.modules()), "no int4 weight became plane words"
        assert all(w.fmt == 3 for w in step._weights() if getattr(w, "group_size", 0) == 128)
    for _ in range(2):  # twice: the workspace is re-zeroed, the state carried
        logits = step(tok, state)
        # the int4 input planes exist exactly where asked for (read by in_proj / fc1 in place of x; by out_proj at
        # one row, written by the SSM update; by fc2 at one row or as routed row programs, written by fc1)
        buf = step._buffers[batch]
        assert (buf["xpl"] is not None) == ("xplanes" in kernels)
        assert (buf["ypl"] is not None) == ("xplanes" in kernels and batch == 1)
        assert (buf["apl"] is not None) == ("xplanes" in kernels and (batch == 1 or "rowprog" in kernels))
        ref = model.step(tok, ref_state)
        torch.testing.assert_close(logits, ref.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.conv_state, ref_state.conv_state, atol=1e-4, rtol=1e-4)
        tok = ref.argmax(-1)


@torch.no_grad()
def test_decode_steps_equal_prefill_path_triton_backend(device):
    """Plain Mamba: Triton prefill of L-2 tokens + 2 fused steps == reference prefill of L tokens."""
    model = build("tiny-mamba", FORMATS["int4"], device)
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), device=device)
    full_logits, full_state = ref_model.prefill(ids)
    model.set_backend("triton")
    logits, state = model.prefill(ids[:, :4])
    torch.testing.assert_close(logits, full_logits[:, :4], atol=1e-3, rtol=1e-3)
    step = FusedDecodeStep(model)
    for t in (4, 5):
        torch.testing.assert_close(step(ids[:, t], state), full_logits[:, t].float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(state.ssm_state, full_state.ssm_state, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_triton_backend_model_matches_reference(device):
    model = build("tiny-blackmamba", FORMATS["int8"], device)
    ref_model = copy.deepcopy(model)
    model.set_backend("triton")
    ids = torch.randint(0, model.config.vocab_size, (1, 19), device=device)  # 19 tokens > 16: grouped MoE path
    assert_prefill_and_step_match(model, ref_model, ids)


def test_triton_backend_records_no_autograd(device):
    """The Triton kernels have no backward: on that backend prefill and step record no autograd graph, even in
    grad mode with trainable weights; the reference backend keeps grad mode (calibration trains through it)."""
    model = build("tiny-blackmamba", FORMATS["float"], device)
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, 5), device=device)
    assert model.prefill(ids)[0].requires_grad
    model.set_backend("triton")
    logits, state = model.prefill(ids)
    assert not logits.requires_grad and logits.grad_fn is None
    assert not state.ssm_state.requires_grad and not state.conv_state.requires_grad
    assert not model.step(ids[:, 0], state).requires_grad
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("fused", [True, False])
@torch.no_grad()
def test_graph_replay_equals_eager(fused, device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    from qmamba.cuda_graph import GraphDecoder

    # float32: split-K partial sums land through atomics in a run-dependent order, so a bf16 step is not bitwise
    # repeatable, and a one-ulp change can flip a near-tied top-1 route (measured on the H100: most rows equal,
    # one row off by up to 3.0 in a logit). In fp32 the same difference stays at rounding level.
    model = build("tiny-blackmamba", FORMATS["int4"], device)
    model.set_backend("triton")
    ids = torch.randint(0, model.config.vocab_size, (3, 7), device=device)
    _, state = model.prefill(ids)
    eager_state = state.clone()
    decoder = GraphDecoder(model, fused=fused)
    tok = ids[:, -1]
    for _ in range(4):
        got = decoder(tok, state)
        ref = FusedDecodeStep(model)(tok, eager_state) if fused else model.step(tok, eager_state).float()
        torch.testing.assert_close(got.float(), ref.float(), atol=1e-3, rtol=1e-3)
        tok = ref.argmax(-1)
    torch.testing.assert_close(state.ssm_state, eager_state.ssm_state, atol=1e-4, rtol=1e-4)
    greedy = decoder.generate(tok, state.clone(), 5)
    manual = []
    st = state.clone()
    t = tok
    for _ in range(5):
        t = decoder(t, st).argmax(-1)
        manual.append(t)
    assert torch.equal(greedy, torch.stack(manual, 1))


@pytest.mark.parametrize("batch,programs", [(1, 4), (3, 2)])
@torch.no_grad()
def test_fused_step_with_shared_norm_planes(batch, programs, device):
    """``DecodePolicy.norm_plane_programs``: each add + norm's int4 input planes written by several programs a row
    (the residual then alternates between two buffers) on a model wide enough for several plane tiles (d = 384:
    three 128-column tiles, padded to four); int4 g128 as plane words read through the planes (in_proj and the
    head at one row, fc1 as routed row programs at 3). Logits and states as the reference model's, two steps."""
    config = dataclasses.replace(preset("tiny-blackmamba"), d_model=384, ffn_hidden=256, dt_rank=8)
    model = quantize_rtn(random_model(config, device), Int4Format(128))
    ids = torch.randint(0, config.vocab_size, (batch, 4), device=device)
    _, state = model.prefill(ids)
    ref_state = state.clone()
    tok = ids[:, 1]
    policy = dataclasses.replace(DecodePolicy.for_device(device), formats=(0, 1, 3), max_rows=1, max_rows_planes=1,
                                 max_rows_routed=8, int4_planes=True, int4_unpack="denorm", planes_mma=False,
                                 routed_row_programs=True, int4_x_planes=True, norm_plane_programs=programs)
    step = FusedDecodeStep(model, policy)
    for _ in range(2):
        logits = step(tok, state)
        buf = step._buffers[batch]
        assert buf["xpl"] is not None and buf["residual"].shape[0] == 2
        ref = model.step(tok, ref_state)
        torch.testing.assert_close(logits, ref.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-4, rtol=1e-4)
        tok = ref.argmax(-1)


@pytest.mark.parametrize("name,fmt,programs", [("tiny-blackmamba", "int4g128", 1), ("tiny-blackmamba", "float", 1),
                                               ("tiny-blackmamba", "binary", 1), ("tiny-mamba", "int4g128", 1),
                                               ("wide-blackmamba", "int4g128", 4), ("tiny-mamba", "int8", 1),
                                               ("tiny-blackmamba", "int4g128-wsums", 1),
                                               ("tiny-mamba", "int4g128-wsums", 1),
                                               ("wide-blackmamba", "int4g128-wsums", 4),
                                               ("tiny-blackmamba", "int4g128-wsums-early", 1),
                                               ("tiny-mamba", "float-early", 1)])
@torch.no_grad()
def test_fused_step_with_norms_in_the_gemvs(name, fmt, programs, device):
    """``DecodePolicy.norm_in_gemvs``: at one row the add + norm between two layers runs in out_proj's / fc2's
    epilogue (NormOut) and in_proj's, fc1's, fc2's and the head's prologue (NormIn); only the first layer's and a
    LayerNorm final norm (BlackMamba's) stay add + norm launches (counted). Logits and states as the reference
    model's over two steps (the sums re-zeroed each step): int4 plane words read through the input planes (split
    over 4 programs a row on a model wide enough: the residual then lives in the second buffer), float, 1-bit
    experts and projections, and plain Mamba (an RMSNorm final norm: the head scales its own products). At batch 2
    the step keeps its add + norm kernels. "-wsums" (``DecodePolicy.producer_word_sums``, with ``planes_joint`` and the
    tile pieces): the producers add their planes' word sums into rows of their own, which the consumers read (and
    which the first add + norm zeroes each step). "-early" (``DecodePolicy.early_reads``): the SSM update's inputs
    and in_proj's conv operands read before the wait (at batch 2 too, for the SSM update)."""
    import qmamba.fused_step as fused_step

    wsums = "-wsums" in fmt
    early = fmt.endswith("-early")
    fmt = fmt.split("-")[0]

    if name == "wide-blackmamba":
        model = quantize_rtn(random_model(dataclasses.replace(preset("tiny-blackmamba"), d_model=384, ffn_hidden=256,
                                                              dt_rank=8), device), Int4Format(128))
    else:
        model = build(name, FORMATS[fmt], device)
    policy = DecodePolicy.for_device(device)
    if fmt == "int4g128":
        policy = dataclasses.replace(policy, formats=(0, 1, 3), max_rows=1, max_rows_planes=1, max_rows_routed=8,
                                     int4_planes=True, int4_unpack="denorm", planes_mma=False,
                                     routed_row_programs=True, int4_x_planes=True, norm_plane_programs=programs)
    elif fmt == "binary":
        policy = dataclasses.replace(policy, formats=DecodePolicy().formats, int4_x_planes=False,
                                     int4_unpack="denorm")
    policy = dataclasses.replace(policy, norm_in_gemvs=True, norm_in_gemvs_binary=fmt == "binary")
    # "-wsums" as the CUDA policy since session 37; the others without (the CUDA policy before it)
    policy = dataclasses.replace(policy, producer_word_sums=wsums, planes_joint=wsums,
                                 int4_tile_pieces=wsums or policy.int4_tile_pieces, early_reads=early)
    step = FusedDecodeStep(model, policy)
    if fmt == "binary":  # 1-bit weights keep their add + norm kernels unless asked (measured slower on the H200)
        assert not FusedDecodeStep(model, dataclasses.replace(policy, norm_in_gemvs_binary=False))._norm_in_gemvs(1)
    calls = []
    real = fused_step.add_norm
    fused_step.add_norm = lambda *a, **kw: (calls.append(kw.get("router_w") is not None), real(*a, **kw))[1]
    try:
        for batch in (1, 2):
            ids = torch.randint(0, model.config.vocab_size, (batch, 4), device=device)
            _, state = model.prefill(ids)
            ref_state = state.clone()
            tok = ids[:, 1]
            for _ in range(2):
                calls.clear()
                logits = step(tok, state)
                fused = step._buffers[batch]["acc"] is not None
                assert fused == (batch == 1)
                if wsums and fused:  # the rows exist, and were written (the step's last NormOut's, for example)
                    rows = step._buffers[batch]
                    assert rows["wx"] is not None and rows["wx"].abs().sum() > 0
                    assert (rows["wy"] is not None) == any(isinstance(p, fused_step._MambaPlan) for p in step.layers)
                final_kernel = model.config.final_norm == "layernorm"
                assert len(calls) == (1 + final_kernel if fused else len(step.layers) + 1)
                ref = model.step(tok, ref_state)
                torch.testing.assert_close(logits, ref.float(), atol=1e-3, rtol=1e-3)
                torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(state.conv_state, ref_state.conv_state, atol=1e-4, rtol=1e-4)
                tok = ref.argmax(-1)
    finally:
        fused_step.add_norm = real


@pytest.mark.parametrize("fmt,mode", [("int4g128", "pdl"), ("int4g128", "pdl-early"), ("int4g128", "off"),
                                      ("binary", "pdl")])
@torch.no_grad()
def test_general_kernels_as_programmatic_dependents(fmt, mode, device, monkeypatch):
    """``DecodePolicy.pdl_general``: at batch 3 the dense matrices (the general small-M kernel) and the conv step are
    launched as programmatic dependents exactly when it is on (with ``pdl``), and the step still equals the model's;
    "-early": with ``general_early_tile``, the dense matrices' first weight tile read before the wait. On a GPU with
    PDL the kernels run so, eagerly and replayed in a CUDA graph; elsewhere (the interpreter has no PDL) the launchers
    record the flag and run without it (the early tile runs there too). "binary": 1-bit projections and experts
    (binary_matmul) and a general fc1, whose activation kernel is one of them."""
    general_pdl = mode != "off"
    import qmamba.fused_step as fs
    from qmamba.kernels.decode_policy import pdl_supported

    model = build("tiny-blackmamba", FORMATS[fmt], device)
    model.set_backend("triton")
    ids = torch.randint(0, model.config.vocab_size, (3, 6), device=device)
    _, state = model.prefill(ids)
    ref_state = state.clone()
    policy = DecodePolicy.for_device(device)
    on_gpu = pdl_supported(device)
    if not on_gpu:  # the CUDA policy's split at batch 2+ (the routed experts' row programs on the decode kernels,
        #             the rest on the general ones), PDL asked for; every launch runs without it
        policy = dataclasses.replace(policy, pdl=True, formats=(0, 1, 3), max_rows=1, max_rows_planes=1,
                                     max_rows_routed=8, int4_planes=True, int4_unpack="denorm", planes_mma=False,
                                     routed_row_programs=True, int4_x_planes=True)
        for name in ("add_norm", "dt_state_update", "decode_linear"):
            real = getattr(fs, name)
            monkeypatch.setattr(fs, name, lambda *a, _real=real, **kw: _real(*a, **{**kw, "pdl": False})
                                if "pdl" in kw else _real(*a, **kw))
        monkeypatch.setattr(fs.FusedDecodeStep, "_decode", lambda self, x, weight, out, **kw: fs.decode_linear(
            x, weight, out, policy=dataclasses.replace(self.policy, pdl=False), **kw))
    policy = dataclasses.replace(policy, pdl_general=general_pdl, general_early_tile=mode == "pdl-early")
    seen = []
    launchers = ("routed_matmul", "causal_conv1d_update_triton") + (("gated_act",) if fmt == "binary" else ())
    for name in launchers:
        real = getattr(fs, name)

        def record(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("pdl", False)))
            if _name == "routed_matmul":
                assert kw["early_tile"] == (mode == "pdl-early"), kw
            return _real(*a, **{**kw, "pdl": kw.get("pdl", False) and on_gpu})
        monkeypatch.setattr(fs, name, record)
    step = FusedDecodeStep(model, policy)
    assert_steps_match(step, model, ids[:, -1], state, ref_state)
    kinds = {name for name, _ in seen}
    assert kinds == set(launchers), kinds  # dense matrices, conv (and a general fc1's activation) on their own
    assert all(flag == general_pdl for _, flag in seen), seen
    if on_gpu:  # replayed in a CUDA graph: equal to the eager step
        from qmamba.cuda_graph import GraphDecoder

        decoder = GraphDecoder(model, fused=True, policy=policy)
        eager = FusedDecodeStep(model, policy)
        graph_state, eager_state, tok = state.clone(), state.clone(), ids[:, -1]
        for _ in range(3):
            got = decoder(tok, graph_state)
            want = eager(tok, eager_state)
            torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=1e-3)
            tok = want.argmax(-1)


@pytest.mark.parametrize("batch,fc2,chunk,norm", [(1, False, 1, False), (3, False, 1, False), (3, True, 1, False),
                                                  (3, True, 4, False), (3, True, 4, True), (2, True, 1, True)])
@torch.no_grad()
def test_fused_step_int8_rows(batch, fc2, chunk, norm, device, monkeypatch):
    """``DecodePolicy.int8_rows`` on a model with int8 activations: at 2+ rows the gated int4 fc1 runs on the W4A8
    row programs (the add + norm writes x as int8 codes, no input planes for it; fc1 still writes fc2's planes), and
    the step equals the reference step whose experts round fc1's input the same way (``QuantExperts.int8_step_fc1``
    in :func:`qmamba.moe.decode_step`), not the one without the rounding; at one row nothing changes. With
    ``int8_rows_fc2`` fc2 runs on them too (fc1's output quantized by a launch of its own; no planes for fc2) and the
    step equals the reference that rounds both inputs (``int8_step_fc2``), not the one that rounds fc1's alone.
    ``chunk``: both on several tiles a step of their K loops (``int8_rows_chunk``, ``int8_rows_fc2_chunk``).
    ``norm``: the add + norm after each MoE layer (the next one a Mamba layer, or the final norm) ended by fc2's last
    program of each row (``int8_rows_fc2_norm``): one add + norm launch for each Mamba layer only, the same step."""
    from qmamba.quant.modules import QuantExperts

    model = build("tiny-blackmamba", FORMATS["int4g128"], device)
    model.int8_activations = True
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    ids = torch.randint(0, model.config.vocab_size, (batch, 5), device=device)
    _, state = model.prefill(ids)
    policy = dataclasses.replace(DecodePolicy.for_device(device), formats=(0, 1, 3), max_rows=1, max_rows_planes=1,
                                 max_rows_routed=8, int4_planes=True, int4_unpack="denorm", planes_mma=False,
                                 routed_row_programs=True, int4_x_planes=True, int8_rows=True, int8_rows_fc2=fc2,
                                 int8_rows_chunk=chunk, int8_rows_fc2_chunk=chunk, int8_rows_fc2_norm=norm)
    step = FusedDecodeStep(model, policy)
    launches = []
    real_add_norm = fused_step_module.add_norm
    monkeypatch.setattr(fused_step_module, "add_norm", lambda *a, **k: launches.append(1) or real_add_norm(*a, **k))
    refs = {}
    for rounding in ((False, False), (True, False), (True, True)):
        for m in experts:
            m.int8_step_fc1, m.int8_step_fc2 = rounding
        refs[rounding] = model.step(ids[:, -1], state.clone()).float()
    for m in experts:
        m.int8_step_fc1 = m.int8_step_fc2 = False
    logits = step(ids[:, -1], state)
    buf = step._buffers[batch]
    moe = sum(isinstance(m, QuantExperts) for m in experts)
    if batch > 1:  # (one row: the norms in the GEMVs)
        assert moe >= 2 and len(launches) == len(step.layers) + 1 - (moe if norm else 0), launches
    assert (buf["xq"] is not None) == (batch > 1) and (buf["aq"] is not None) == (batch > 1 and fc2)
    assert buf["xpl"] is None if batch > 1 else buf["xpl"] is not None  # (at one row fc1 and the head read them)
    assert (buf["apl"] is not None) == (not fc2)
    want = (batch > 1, batch > 1 and fc2)
    torch.testing.assert_close(logits, refs[want], atol=1e-3, rtol=1e-3)
    err = {r: (logits - ref).abs().max().item() for r, ref in refs.items()}
    if batch > 1:  # the rounding is what the step does: 100x closer to the reference that rounds as it does
        assert all(err[want] * 100 < e for r, e in err.items() if r != want), err
    else:  # one row: no rounding in either
        assert err[(False, False)] == err[(True, False)] == err[(True, True)]
