"""The decode linear kernel as the CUDA policy launches it (and the prefill's tile-map kernel, the general int4 GEMM
kernels of the prefill and batched decode, the prefill's chunked selective scan) compiles for sm_90 (Triton's own ptxas, no GPU) at every
BlackMamba-2.8B shape, for int4 plane words and float weights (and the 1-bit matmul's bit-position dots of batched
decode), without a stack frame (spills). The interpreter runs
the kernels' arithmetic but never the compiler: this catches what only the compiler rejects, and a register blow-up
of the default path, on a machine without a GPU. The same kernels also compile for the consumer GPUs' sm_80 / sm_89 /
sm_120 (no PDL there), with the general matmuls' tiles inside those GPUs' shared memory (99 KB a block on sm_89 and
sm_120), which only the H200 has run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


INSPECT = ROOT / "benchmarks" / "inspect_decode_kernel.py"


def _newer_triton_stack() -> int:
    """Bytes of stack allowed where a Triton newer than the device image's 3.6 (which the timed figures come from)
    spills a little that 3.6 does not: this machine's 3.9 gives the joint fc1 (and in_proj with the norms in the
    GEMVs) 8 bytes; none with 3.6."""
    import triton

    return 0 if triton.__version__.startswith("3.6") else 8


def _spill_free_but_joint_fc1(lines) -> bool:
    """``inspect_decode_kernel.py`` report lines (shape, variant, ..., stack at field 5): no stack, but fc1's up to
    :func:`_newer_triton_stack` (its joint products, ``DecodePolicy.planes_joint``, where ``planes_joint_gated`` is
    on: not in the CUDA policy since session 38)."""
    allowance = _newer_triton_stack()
    fields = [line.split() for line in lines]
    return all(int(f[5]) == 0 or (f[0] == "fc1_gated" and int(f[5]) <= allowance) for f in fields)


def _compiled(*argv, timeout: int):
    """Run ``python *argv`` with Triton compiling (not interpreting) and the checkout importable; its stdout, or a
    failure with the end of its output. The caller's ``PYTHONPATH`` is kept after the checkout, so a Triton on it
    compiles here too (``.ci/run`` runs these tests again with the device image's Triton 3.6 that way: session 48's
    quantizer compiled with 3.9 and not with 3.6, and until session 49 this function dropped that path)."""
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))
    run = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_cuda_default_compiles_without_spills():
    """The CUDA policy's one-row kernels at the six shapes, int4 plane words and bf16, compile for sm_90 without
    spills with the device image's Triton 3.6. The int4 matrices take every product of a row before any reduction
    (``DecodePolicy.planes_joint``, since session 37), but for fc1 since session 38 (``planes_joint_gated``); Triton
    3.9 (this machine's) gave the joint fc1 8 bytes of stack, allowed there, no more."""
    stdout = _compiled(str(INSPECT), "--variants", "cuda_default,cuda_default_float", timeout=900)
    lines = [line for line in stdout.splitlines() if " regs " in line]
    assert len(lines) == 12, stdout  # 6 shapes x 2 weight forms
    assert _spill_free_but_joint_fc1(lines), stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_routed_row_programs_compile_at_batch_eight():
    """``--rows 8``: the routed expert stacks as batched decode's row programs launch them (one program row per input
    row: 8 x 368 programs for fc2), without spills."""
    stdout = _compiled(str(INSPECT), "--rows", "8", "--shapes", "fc2,in_proj", "--variants", "rowprog", "--no-stack",
                       timeout=600)
    lines = [line for line in stdout.splitlines() if " regs " in line]
    assert len(lines) == 1 and lines[0].startswith("fc2 ") and " programs  2944 " in lines[0], stdout  # no in_proj


_TILE_MAP_COMPILE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from inspect_decode_kernel import compile_recorded, report
from qmamba.kernels import routing
m, e = 2048, 8
t = -(-m // 64) + e
i32 = lambda n: torch.empty(n, dtype=torch.int32)
args = (i32(m), i32(m), i32(t), i32(t), i32(t), m, e, t, 64)
r = report(compile_recorded(routing._expert_tile_map_kernel, args, routing.tile_map_launch(e, True, m), 90))
print("regs", r["regs"], "stack", r["stack"])
"""

_ADD_NORM_COMPILE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from inspect_decode_kernel import _Recorder, compile_recorded, report
from qmamba.kernels import decode_step
real = decode_step._add_norm_kernel
decode_step._add_norm_kernel = rec = _Recorder(real)
rows, d = 4096, 1472
h, w = torch.empty(rows, d, dtype=torch.bfloat16), torch.empty(d, dtype=torch.bfloat16)
res = torch.empty(rows, d)
decode_step.add_norm_rows(res, h, w, 1e-5)            # a prefill layer: residual + h, RMSNorm
decode_step.add_norm_rows(None, h, w, 1e-5, w)        # the first layer / a LayerNorm
x = torch.empty(8, d, dtype=torch.bfloat16)
decode_step.add_norm(x, torch.empty(8, d), w, 1e-5, h=h[:8], router_w=torch.empty(8, d, dtype=torch.bfloat16),
                     expert_idx=torch.empty(8, dtype=torch.int32), expert_weight=torch.empty(8), pdl=True)
x1 = torch.empty(1, d, dtype=torch.bfloat16)                # batch 1, the int4 input planes over 4 programs
decode_step.add_norm(x1, torch.empty(1, d), w, 1e-5, h=h[:1], router_w=torch.empty(8, d, dtype=torch.bfloat16),
                     expert_idx=torch.empty(1, dtype=torch.int32), expert_weight=torch.empty(1), pdl=True,
                     x_planes=torch.empty(1, 9, 2048), plane_programs=4, residual_out=torch.empty(1, d))
decode_step.add_norm(x1, torch.empty(1, d), w, 1e-5, token_ids=torch.zeros(1, dtype=torch.long),  # the first, zeroing
                     embedding=torch.empty(50304, d, dtype=torch.bfloat16), pdl=True,  # the NormOut sums
                     x_planes=torch.empty(1, 9, 2048), plane_programs=4, residual_out=torch.empty(1, d),
                     zero=torch.empty(37, 9))
decode_step.add_norm(x, torch.empty(8, d), w, 1e-5, h=h[:8], router_w=torch.empty(8, d, dtype=torch.bfloat16),
                     expert_idx=torch.empty(8, dtype=torch.int32), expert_weight=torch.empty(8), pdl=True,
                     x_int8=(torch.empty(8, 1536, dtype=torch.int8), torch.empty(8), torch.empty(8, 16)))  # batch 8,
#                                                                              x as int8 codes for fc1's row programs
for grid, args, meta in rec.calls:
    meta = dict(meta, num_warps=4)
    meta.pop("launch_pdl", None)
    r = report(compile_recorded(real, args, meta, 90))
    print("regs", r["regs"], "stack", r["stack"])
"""


_NORM_GEMVS_COMPILE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from inspect_decode_kernel import _Recorder, compile_recorded, report
from qmamba.kernels import decode_linear as dl
from qmamba.kernels.decode_linear import NormIn, NormOut
from qmamba.kernels.decode_policy import DecodePolicy
from qmamba.quant.formats import Int4Format
from qmamba.quant.layout import int4_x_planes
real = dl._decode_linear_kernel
dl._decode_linear_kernel = rec = _Recorder(real)
pol = DecodePolicy.cuda(132, True)
W = pol.producer_word_sums  # the word sums' rows read (and added by the producers), as the fused step passes them
def ws(words):
    return dict(x_word_sums=torch.zeros(1, words)) if W else {}
fmt = Int4Format(128)
def planes(n, k, e=None):
    lead = (e,) if e else ()
    return fmt.kernel_weight(fmt.quantize_rtn(torch.randn(*lead, n, k) / k ** 0.5), n, k).to_planes()
d, di, f = 1472, 2944, 3872
acc = torch.zeros(9)
x, y = torch.randn(1, d, dtype=torch.bfloat16), torch.randn(1, di, dtype=torch.bfloat16)
xpl, ypl = int4_x_planes(x), int4_x_planes(y)
nin = NormIn(acc, d, 1e-5)
route = NormIn(acc, d, 1e-5, route=True, router_b=torch.zeros(8))
idx = torch.zeros(1, dtype=torch.int32)
nout = NormOut(torch.zeros(1, d), torch.ones(d, dtype=torch.bfloat16), acc, torch.empty(1, d, dtype=torch.bfloat16),
               planes=torch.zeros(1, 9, 2048))
conv = (torch.empty(1, di, 4, dtype=torch.bfloat16), torch.empty(di, 4, dtype=torch.bfloat16),
        torch.empty(di, dtype=torch.bfloat16), torch.empty(1, di, dtype=torch.bfloat16))
dl.decode_linear(x, planes(2 * di, d), torch.empty(1, 2 * di), conv_out=conv, policy=pol, x_planes=xpl,
                 x_plane_sums=False, norm_in=nin, **ws(256))                                                  # in_proj
dl.decode_linear(y, planes(d, di), torch.empty(1, d), policy=pol, x_planes=ypl, x_plane_sums=False,
                 norm_out=NormOut(nout.residual, nout.weight, acc, nout.x, nout.planes,
                                  router_w=torch.empty(8, d, dtype=torch.bfloat16),
                                  word_sums=torch.zeros(1, 256) if W else None), **ws(512))  # out_proj, router
dl.decode_linear(x, planes(2 * f, d, 8), torch.empty(1, f, dtype=torch.bfloat16), row_expert=idx, gated="silu",
                 policy=pol, x_planes=xpl, x_plane_sums=False, norm_in=route,
                 out_planes=torch.zeros(1, 9, 4096), out_word_sums=torch.zeros(1, 512) if W else None, **ws(256))  # fc1
a = torch.randn(1, f, dtype=torch.bfloat16)
dl.decode_linear(a, planes(d, f, 8), torch.empty(1, d), row_expert=idx, row_scale=torch.empty(1), policy=pol,
                 expert_ready=True, x_planes=int4_x_planes(a), x_plane_sums=False,
                 norm_in=NormIn(acc, d, 1e-5, scale=False, route=True),
                 norm_out=NormOut(nout.residual, nout.weight, acc, nout.x, nout.planes,
                                  word_sums=torch.zeros(1, 256) if W else None), **ws(512))          # fc2
dl.decode_linear(x, planes(50304, d), torch.empty(1, 50304), policy=pol, x_planes=xpl, x_plane_sums=False,
                 norm_in=nin, **ws(256))  # int4 head
dl.decode_linear(x, planes(2 * di, d), torch.empty(1, 2 * di), conv_out=conv, policy=pol, x_planes=xpl,
                 x_plane_sums=False, norm_in=nin, conv_ready=True, **ws(256))     # in_proj, DecodePolicy.early_reads
for grid, args, meta in rec.calls:
    r = report(compile_recorded(real, args, meta, 90))
    print("regs", r["regs"], "stack", r["stack"], "sass", sum(r["ops"].values()))
"""


_DT_STATE_COMPILE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from inspect_decode_kernel import _Recorder, compile_recorded, report
from qmamba.kernels import decode_step
real = decode_step._dt_state_update_kernel
decode_step._dt_state_update_kernel = rec = _Recorder(real)
b, di, r, n, w = 1, 2944, 92, 16, 4  # BlackMamba-2.8B, the conv step fused
e = lambda *s: torch.empty(*s, dtype=torch.bfloat16)
for dt_w in (e(di, r), decode_step.aligned_rows(e(di, r))):  # as stored (row stride 92), padded to 96
    for block_d in (8, 16, 32):
        decode_step.dt_state_update(e(b, r + 2 * n), dt_w, e(di), e(b, di), e(b, di), torch.empty(di, n), e(di),
                                    torch.empty(b, di, n), e(b, di), conv=(e(b, di, w), e(di, w), e(di)),
                                    block_d=block_d)
decode_step.dt_state_update(e(b, r + 2 * n), decode_step.aligned_rows(e(di, r)), e(di), e(b, di), e(b, di),
                            torch.empty(di, n), e(di), torch.empty(b, di, n), e(b, di), conv=(e(b, di, w), e(di, w),
                            e(di)), block_d=8, pdl=True, inputs_ready=True)  # DecodePolicy.early_reads
for grid, args, meta in rec.calls:
    meta = dict(meta, num_warps=4)
    r = report(compile_recorded(real, args, meta, 90))
    print("sass", sum(r["ops"].values()), "regs", r["regs"], "stack", r["stack"])
"""


_BINARY_DOTS_COMPILE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from inspect_decode_kernel import _Recorder, compile_recorded, report
from qmamba.kernels import binary_matmul as bm
from qmamba.kernels.weights import BinaryWeight
from qmamba.quant.binary import BinaryFormat
real = bm._binary_matmul_kernel
bm._binary_matmul_kernel = rec = _Recorder(real)
bm.binary_word_dots_tile = lambda n, k, rows, device: (64, 4, 2)  # the CUDA tile, split in two
for n, k in ((5888, 1472), (1472, 2944)):  # BlackMamba-2.8B's in_proj / out_proj, 8 rows of batched decode
    w = BinaryWeight.from_packed(BinaryFormat().quantize_rtn(torch.randn(n, k)), n, k)
    bm.binary_matmul(torch.randn(8, k).to(torch.bfloat16), w)
for grid, args, meta in rec.calls:
    meta = dict(meta, SIGN16=True)  # as on CUDA (the signs built in bf16's own bits)
    r = report(compile_recorded(real, args, meta, 90))
    print("hgmma", r["ops"]["HGMMA"], "regs", r["regs"], "stack", r["stack"])
"""


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_binary_word_dots_compile():
    """The 1-bit bit-position dots (batched decode's in_proj / out_proj at 8 rows, bf16, split along K) compile for
    sm_90 to warpgroup tensor-core products (one a bit position: 32 a 512-column tile) without spills."""
    stdout = _compiled("-c", _BINARY_DOTS_COMPILE, str(ROOT / "benchmarks"), timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("hgmma")]
    assert len(lines) == 2 and all(line.startswith("hgmma 32 ") and line.endswith("stack 0") for line in lines), stdout


_GENERAL_PDL_COMPILE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from inspect_decode_kernel import _Recorder, compile_recorded, report
from inspect_gemm_kernel import _CudaLike
from qmamba.kernels import causal_conv1d as cc, quant_matmul as qm
from qmamba.kernels.matmul_configs import MatmulPolicy, pick_config
from qmamba.kernels.routing import ROUTE_DENSE
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.formats import Int4Format
d, di = 1472, 2944  # BlackMamba-2.8B's dense matrices at batch 8, int4 plane words and bf16
real_mm, real_conv = qm._dequant_matmul_kernel, cc._causal_conv1d_update_kernel
qm._dequant_matmul_kernel = mm = _Recorder(real_mm)
cc._causal_conv1d_update_kernel = conv = _Recorder(real_conv)
x8 = lambda k: torch.empty(8, k, dtype=torch.bfloat16)
for n, k in ((2 * di, d), (124, di), (d, di)):  # in_proj, x_proj, out_proj
    w = torch.randn(n, k) / k ** 0.5
    for weight in (Int4Format(128).kernel_weight(Int4Format(128).quantize_rtn(w), n, k).to_planes(),
                   PackedWeight.from_float(w.to(torch.bfloat16))):
        cfg = pick_config(8, weight, _CudaLike(), ROUTE_DENSE, MatmulPolicy())
        out = torch.empty(8, n) if cfg.split_k > 1 else None
        for early in (False, True):  # DecodePolicy.general_early_tile: the first weight tile before the wait
            qm.dequant_matmul(x8(k), weight, config=cfg, out=out, policy=MatmulPolicy(), pdl=True, early_tile=early)
cc.causal_conv1d_update_triton(x8(di), torch.empty(8, di, 4, dtype=torch.bfloat16),
                               torch.empty(di, 4, dtype=torch.bfloat16), torch.empty(di, dtype=torch.bfloat16),
                               out_state=torch.empty(8, di, 4, dtype=torch.bfloat16), out=x8(di), pdl=True)
from qmamba.kernels import binary_matmul as bm, fused_moe as fm
from qmamba.kernels.weights import BinaryWeight
from qmamba.quant.binary import BinaryFormat
real_bin, real_act = bm._binary_matmul_kernel, fm._gated_act_kernel
bm._binary_matmul_kernel = binr = _Recorder(real_bin)
fm._gated_act_kernel = act = _Recorder(real_act)
bm.binary_word_dots_tile = lambda n, k, rows, device: (64, 4, 2)  # the CUDA tile of 1-bit in_proj at batch 8
w = BinaryWeight.from_packed(BinaryFormat().quantize_rtn(torch.randn(2 * di, d)), 2 * di, d)
bm.binary_matmul(x8(d), w, pdl=True)
fm.gated_act(torch.empty(8, 7744, dtype=torch.bfloat16), "gelu", True, pdl=True)  # a general fc1's activation
for label, kernel, rec in (("matmul", real_mm, mm), ("conv", real_conv, conv), ("binary", real_bin, binr),
                           ("act", real_act, act)):
    for grid, args, meta in rec.calls:
        assert meta.pop("launch_pdl") is True and meta["PDL"] is True
        meta = dict(meta, num_warps=meta.get("num_warps", 4))
        if label == "binary":
            meta["SIGN16"] = True  # as on CUDA
        compiled = compile_recorded(kernel, args, meta, 90)
        r = report(compiled)
        lines = [l for l in compiled.asm["ptx"].splitlines() if "ld.global" in l or "griddepcontrol" in l]
        wait = next(i for i, l in enumerate(lines) if "griddepcontrol.wait" in l)
        launch = next(i for i, l in enumerate(lines) if "griddepcontrol.launch_dependents" in l)
        after = len(lines) - wait - 2
        name = label + ("_early" if meta.get("EARLY_TILE") else "")
        print(name, "grid", grid, "regs", r["regs"], "loads", wait, after, "order", int(wait < launch), "stack", r["stack"])
"""


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_general_kernels_compile_as_programmatic_dependents():
    """The batch-8 step's general kernels with ``DecodePolicy.pdl_general`` (the dense matrices on the small-M kernel,
    int4 plane words and bf16; the conv step; 1-bit in_proj's bit-position dots, a general fc1's activation) compile
    for sm_90 with the wait before the launch of the dependents and without spills; the matmul reads nothing before
    its wait but, with ``DecodePolicy.general_early_tile`` (int4 plane words), its first weight tile; the conv step
    everything but x (its old state, weights and bias)."""
    stdout = _compiled("-c", _GENERAL_PDL_COMPILE, str(ROOT / "benchmarks"), timeout=600)
    lines = [line.split() for line in stdout.splitlines() if line.startswith(("matmul", "conv", "binary", "act"))]
    assert len(lines) == 15 and all(f[-1] == "0" and f[-3] == "1" for f in lines), stdout
    assert all(f[-6] == "0" for f in lines if f[0] in ("matmul", "binary", "act")), stdout  # loads before the wait
    early = [int(f[-6]) for f in lines if f[0] == "matmul_early"]
    assert len(early) == 3 and all(loads > 0 for loads in early), stdout  # the first tile's
    assert [(int(f[-6]) > 0, f[-5]) for f in lines if f[0] == "conv"] == [(True, "1")], stdout  # x alone after it


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_dt_state_update_kernel_compiles():
    """The decode step's SSM update as the fused step launches it on CUDA (``DecodePolicy.ssm_block_d`` 8, the CUDA
    policy's at one row since session 17; ``ssm_block_d_batched`` 16, its batch 2+ since session 31; 32, the dataclass
    default) compiles for sm_90 at BlackMamba-2.8B's shapes without spills; with dt_proj's rows padded to 96 elements
    (``aligned_rows``, ``DecodePolicy.dt_rows_aligned``) to under 2/3 of the instructions a thread of the weight as
    stored (session 31, Triton 3.6 and 3.9: 848 -> 384 at 8 channels a program, 2,032 -> 840 at 32, the softplus of
    every channel no longer evaluated by every thread)."""
    stdout = _compiled("-c", _DT_STATE_COMPILE, str(ROOT / "benchmarks"), timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("sass")]
    assert len(lines) == 7 and all(line.endswith("stack 0") for line in lines), stdout
    sass = [int(line.split()[1]) for line in lines]
    assert all(sass[3 + i] < 2 / 3 * sass[i] for i in range(3)), stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_expert_tile_map_kernel_compiles():
    """The prefill's tile-map kernel (one program) as its CUDA launch compiles it, at 2048 rows and 8 experts."""
    stdout = _compiled("-c", _TILE_MAP_COMPILE, str(ROOT / "benchmarks"), timeout=600)
    assert "stack 0" in stdout, stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_add_norm_kernel_compiles():
    """The residual add + norm kernel as the prefill (rows, RMSNorm / LayerNorm, with and without a residual) and the
    decode step (router, PDL; with the int4 input planes shared by 4 programs a row; at batch 8 with x quantized to
    int8 for fc1's W4A8 row programs, ``DecodePolicy.int8_rows``) launch it."""
    stdout = _compiled("-c", _ADD_NORM_COMPILE, str(ROOT / "benchmarks"), timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("regs")]
    assert len(lines) == 6 and all(line.endswith("stack 0") for line in lines), stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_int8_binary_and_x_in_tile_compile():
    """int8 and 1-bit weights on the decode kernel as the CUDA policy launches them (int8: the CUDA default since
    session 16; 1-bit: at batch 1 since session 20, with the "denorm" reading) and int4 with ``int4_x_in_tile`` (the CUDA default since
    session 17: ``bench_decode.py --variants default,xtile``) and on the int4 input planes (``int4_x_planes``, the
    CUDA default since session 19) compile for sm_90 at every shape; int8 and the int4 variants without spills (as
    the paths they mirror; Triton 3.9, not the device's 3.6, gives the joint fc1 8 bytes of stack, allowed as in
    ``test_cuda_default_compiles_without_spills``)."""
    stdout = _compiled(str(INSPECT), "--variants", "cuda_int8,cuda_binary,cuda_x_in_tile,cuda_x_planes", timeout=900)
    lines = [line for line in stdout.splitlines() if " regs " in line]
    assert len(lines) == 24, stdout  # 6 shapes x 4 variants
    int4 = [line for line in lines if " cuda_x_in_tile " in line or " cuda_x_planes " in line]
    assert all(" stack    0 " in line for line in lines if " cuda_int8 " in line), stdout
    assert _spill_free_but_joint_fc1(int4), stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_int4_gemm_defaults_compile_without_spills():
    """The grouped expert GEMM of the prefill (M = 2048, 64 x 128 tiles) and the small-M kernel of batched decode (8
    rows routed by expert) on int4 plane words, as the CUDA defaults launch them at BlackMamba-2.8B's fc1 / fc2:
    with the codes unpacked as floats (the default until session 34; the pairs that replaced it are
    ``test_plane_code_pairs_compile``'s) no integer-to-float conversion is left and, as ``x W^T``, nothing spills; the
    prefill GEMM as ``W x^T`` (the default since session 19) keeps its dequantized tile out of shared memory."""
    stdout = _compiled(str(ROOT / "benchmarks" / "inspect_gemm_kernel.py"), "--no-stack", "--weight-left",
                       timeout=900)
    lines = [line for line in stdout.splitlines() if " regs " in line]
    assert len(lines) == 10, stdout  # 2 shapes x 2 cases x 2 unpackings, and the prefill as W x^T
    count = lambda op, line: int(m.group(1)) if (m := re.search(rf"\b{op}=(\d+)", line)) else 0  # noqa: E731
    i2f = {line: count("I2F", line) for line in lines}
    # MatmulPolicy.plane_weight_left (the default): the dequantized tile no longer goes through shared memory (a few
    # stores at most, against 42 as the right operand). Spills are allowed: none with Triton 3.9's ptxas; with
    # Triton 3.6's (the H200 image) 80 bytes of stack at 255 registers until session 22's empty-tile skip, none at
    # 231 registers since
    left = [line for line in lines if "W x^T" in line]
    assert len(left) == 2 and all(count("STS", line) <= 4 for line in left), stdout
    lines = [line for line in lines if line not in left]
    floats = [line for line in lines if " float codes " in line]
    assert len(floats) == 4 and all(" stack    0 " in line and i2f[line] <= 4 for line in floats), stdout
    assert all(i2f[line] >= 64 for line in lines if " int   codes " in line), stdout  # one per code, as before


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("arch", [90, 80])
def test_plane_code_pairs_compile(arch):
    """``MatmulPolicy.plane_code_pairs`` (a candidate whose inline PTX only a GPU runs; the interpreter takes its
    elementwise twin): the grouped expert GEMM of the prefill (``W x^T``) and the small-M kernel at BlackMamba-2.8B's
    fc1 compile for the H100 / H200 without spills and for Ampere (``fma.rn.bf16x2`` is sm_80's), the codes' zero
    points coming off in packed 16-bit pairs (HADD2 on sm_90, HFMA2 on sm_80) with no integer-to-float conversion
    a code, in fewer instructions than the float codes."""
    stdout = _compiled(str(ROOT / "benchmarks" / "inspect_gemm_kernel.py"), "--arch", str(arch), "--shapes", "fc1",
                       "--weight-left", "--pairs", timeout=900)
    lines = {" ".join(m.group(1).split()): line for line in stdout.splitlines()
             if (m := re.match(r"\S+\s+(.*?)\s+tile ", line))}  # "prefill pairs exact" -> its line
    count = lambda op, line: int(m.group(1)) if (m := re.search(rf"\b{op}=(\d+)", line)) else 0  # noqa: E731
    sass = lambda line: int(re.search(r"SASS +(\d+)", line).group(1))  # noqa: E731
    packed = "HADD2" if arch >= 90 else "HFMA2"
    for case in ("prefill", "batch8"):
        base = lines[f"{case} float codes, W x^T" if case == "prefill" else f"{case} float codes"]
        for mode in ("exact", "scaled"):
            line = lines[f"{case} pairs {mode}"]
            # (sm_80: Triton 3.9 gives the scaled prefill GEMM 48 bytes of stack at 168 registers, 3.6 none)
            # a few conversions for indices (2-6 by Triton version and target), not one a code (64+ with integer codes)
            assert (" stack    0 " in line or arch < 90) and count("I2F", line) < 16, stdout
            assert count(packed, line) >= 32 and sass(line) < sass(base), stdout


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_persistent_ahead_keeps_weight_loads_in_flight_through_the_barrier():
    """benchmarks/probe_launch.py's persistent chain (one tile a program, the next layers' weights loaded before each
    grid barrier): no spills, and no instruction between the barrier's release and the end of its spin loop waits
    for those loads (the probe exits non-zero otherwise)."""
    stdout = _compiled(str(ROOT / "benchmarks" / "probe_launch.py"), "--compile-only", timeout=900)
    lines = [line for line in stdout.splitlines() if line.startswith("ahead")]
    assert len(lines) == 10, stdout
    assert all(" stack 0 " in line and line.endswith("before the spin: []") for line in lines), stdout


# two instructions of that kernel's sm_90 SASS (Triton 3.6), as cuobjdump lists them, and what their control codes say
_SASS = """
        /*2a70*/               @P6 REDG.E.ADD.STRONG.GPU desc[UR10][R4.64], R31 ;        /* 0x0000001f0400698e */
                                                                                         /* 0x0021e4000c10e18a */
        /*2ac0*/               @P5 LDG.E.128 R52, desc[UR10][R28.64] ;                   /* 0x0000000a1c345981 */
                                                                                         /* 0x000362000c1e1d00 */
"""


def test_control_codes_decode_scoreboards():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inspect_decode_kernel import control_codes

    red, ldg = control_codes(_SASS)
    assert (red["addr"], red["text"]) == (0x2A70, "@P6 REDG.E.ADD.STRONG.GPU desc[UR10][R4.64], R31")
    assert (red["write_sb"], red["read_sb"], red["waits"]) == (None, 0, [1])
    assert (ldg["write_sb"], ldg["read_sb"], ldg["waits"], ldg["stall"]) == (5, 1, [], 1)


def _instruction(addr: int, text: str, write_sb=None, read_sb=None, waits=()) -> str:
    ctrl = 1 | (7 if write_sb is None else write_sb) << 5 | (7 if read_sb is None else read_sb) << 8
    ctrl |= sum(1 << b for b in waits) << 11
    return (f"        /*{addr:04x}*/  {text} ;  /* 0x{0:016x} */\n"
            f"                                        /* 0x{ctrl << 41:016x} */\n")


def test_ahead_wait_detector_finds_a_wait_for_the_weights():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    probe_launch = pytest.importorskip("probe_launch")

    def listing(spin_wait):
        return "".join([
            _instruction(0x100, "REDG.E.ADD.STRONG.GPU desc[UR4][R2.64], R5", read_sb=0),
            _instruction(0x110, "@P0 LDG.E.128 R8, desc[UR4][R6.64]", write_sb=5, read_sb=1),
            _instruction(0x120, "LDG.E.STRONG.GPU R4, desc[UR4][R2.64]", write_sb=2, waits=[0]),
            _instruction(0x130, "ISETP.GE.AND P1, PT, R4, R3, PT", waits=spin_wait),
            _instruction(0x140, "@!P1 BRA 0x120"),
            _instruction(0x150, "FADD R8, R8, R9", waits=[5]),  # the use, after the barrier: fine
        ])
    assert probe_launch.ahead_waits_before_spin(listing([2])) == []
    assert probe_launch.ahead_waits_before_spin(listing([2, 5])) == ["0x130 ISETP.GE.AND P1, PT, R4, R3, PT"]


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_norms_in_the_gemvs_compile():
    """``DecodePolicy.norm_in_gemvs`` (the CUDA default at one row): in_proj / fc1 / the head scaling by the
    accumulated 1 / rms (fc1, fc2 routing from the sums), out_proj / fc2 adding the residual and the sums by atomic
    adds, at BlackMamba-2.8B's shapes on int4 plane words, as the CUDA policy launches them since session 37 (the
    input's word sums read from a row of their own, the output planes' added into one: ``producer_word_sums``, with
    ``planes_joint``, fc1 without it since session 38), compile for sm_90 without spills (Triton 3.6: 544 / 576 / 928
    / 720 / 480 SASS instructions a thread against 608 / 632 / 968 / 752 / 544 before session 37). Triton 3.9 (this machine's) may give in_proj and fc1 8 bytes
    of stack each (seen in sessions 26 and 33), where the H200 image's 3.6, which the timed figures come from, has
    none; more than that fails here too. A sixth launch: in_proj with its conv operands read before the wait
    (``conv_ready``, ``DecodePolicy.early_reads``; Triton 3.6: the same 544 instructions and 64 registers)."""
    allowance = _newer_triton_stack()
    stdout = _compiled("-c", _NORM_GEMVS_COMPILE, str(ROOT / "benchmarks"), timeout=900)
    lines = [line for line in stdout.splitlines() if line.startswith("regs")]
    assert len(lines) == 6, stdout
    stacks = [int(line.split()[3]) for line in lines]
    assert max(stacks[0], stacks[2], stacks[5]) <= allowance and stacks[1] == stacks[3] == stacks[4] == 0, stdout


# Shared memory a block may use (opt-in maximum, bytes): a launch above it fails with "out of resources".
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}

_GEMM_SHARED = """
import sys, torch
sys.path.insert(0, sys.argv[1])
arch, limit = int(sys.argv[2]), int(sys.argv[3])
from inspect_decode_kernel import _Recorder, compile_recorded
from inspect_gemm_kernel import _CudaLike
from qmamba.kernels import dequant_gemm as dg, quant_matmul as qm
from qmamba.kernels.matmul_configs import MatmulPolicy, gemm_config, pick_config
from qmamba.kernels.routing import ROUTE_BY_EXPERT, expert_tile_map
from qmamba.kernels.weights import PackedWeight
from qmamba.quant.formats import Int4Format, Int8Format
k, n, e = 1472, 7744, 8  # BlackMamba-2.8B's expert fc1 (8 experts)
w = torch.randn(e, n, k) / k ** 0.5
stacks = {"bf16": PackedWeight.from_float(w.to(torch.bfloat16)),
          "int8": Int8Format().kernel_weight(Int8Format().quantize_rtn(w), n, k),
          "int4": Int4Format(128).kernel_weight(Int4Format(128).quantize_rtn(w), n, k).to_planes()}
real = {"gemm": dg._dequant_gemm_kernel, "small": qm._dequant_matmul_kernel}
for name, stack in stacks.items():
    for m in (2048, 256, 64, 8):
        dg._dequant_gemm_kernel, qm._dequant_matmul_kernel = gemm, small = _Recorder(real["gemm"]), _Recorder(real["small"])
        try:
            x = torch.randn(m, k).to(torch.bfloat16)
            idx = torch.randint(0, e, (m,), dtype=torch.int32)
            if m > 16:
                cfg = gemm_config(m, stack, _CudaLike(), MatmulPolicy())
                tiles = expert_tile_map(idx, e, cfg.block_m)
            else:
                cfg, tiles = pick_config(m, stack, _CudaLike(), ROUTE_BY_EXPERT, MatmulPolicy()), None
            qm.dequant_matmul(x, stack, row_expert=idx, tiles=tiles, config=cfg, policy=MatmulPolicy())
        finally:
            dg._dequant_gemm_kernel, qm._dequant_matmul_kernel = real["gemm"], real["small"]
        for kernel, rec in ((real["gemm"], gemm), (real["small"], small)):
            for grid, args, meta in rec.calls:
                shared = compile_recorded(kernel, args, meta, arch).metadata.shared
                print("shared", name, m, cfg.block_m, cfg.block_n, cfg.num_stages, shared, "over" if shared > limit else "ok")
"""


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("arch", [80, 89, 120])
def test_kernels_compile_for_consumer_gpus(arch):
    """Ampere (sm_80; sm_86 has sm_89's shared memory), Ada (sm_89, RTX 40) and Blackwell consumer GPUs (sm_120, RTX
    50): the decode linears as the CUDA policy launches them there (no PDL) at every BlackMamba-2.8B shape, int4 and
    float, compile without spills; the grouped expert GEMM and the small-M kernel (bf16, int8, int4 plane words, at
    the prefill's and batched decode's row counts) fit the GPU's shared memory with the tiles tuned on the H200."""
    stdout = _compiled(str(INSPECT), "--arch", str(arch), "--variants", "cuda_default,cuda_default_float",
                       "--no-stack", timeout=600)
    lines = [line for line in stdout.splitlines() if " regs " in line]
    assert len(lines) == 12 and all(" stack    0 " in line for line in lines), stdout
    stdout = _compiled("-c", _GEMM_SHARED, str(ROOT / "benchmarks"), str(arch), str(SHARED_LIMIT[arch]), timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("shared")]
    print("\n".join(lines))  # (the figures of benchmarks/results.md, "Session 28": pytest -s shows them)
    assert len(lines) == 12 and all(line.endswith(" ok") for line in lines), stdout


_W4A8_COMPILE = """
import sys
sys.path.insert(0, {bench!r})
import inspect_gemm_kernel as ig
w = ig.planes_stack(*ig.SHAPES["fc1"])
r = ig.report(ig.compile_w4a8(w, 90, 64, 128, 4, 3, False, True, "gelu")[0])
loop = ig.loop_body(r["sass"])
print("gemm", r["stack"], loop.count("IGMMA"), loop.count("STS"))
r = ig.report(ig.compile_w4a8_rows(w, 90, rows=8, block_n=16, gate="gelu"))
print("rows", r["stack"], r["ops"]["IDP"], r["ops"]["I2F"] + r["ops"]["I2FP"])
r = ig.report(ig.compile_w4a8_rows(w, 90, rows=8, block_n=16, gate="gelu", step=True))
print("steprows", r["stack"], r["ops"]["IDP"], r["ops"]["I2F"] + r["ops"]["I2FP"])
r = ig.report(ig.compile_w4a8_rows(ig.planes_stack(*ig.SHAPES["fc2"]), 90, rows=8, block_n=32, row_scale=True))
print("fc2rows", r["stack"], r["ops"]["IDP"])
from qmamba.kernels.decode_policy import DecodePolicy
p = DecodePolicy.cuda(132, True)
r = ig.report(ig.compile_w4a8_rows(w, 90, rows=8, block_n=p.int8_rows_block_n, gate="gelu", step=True,
                                   chunk=p.int8_rows_chunk))
r2 = ig.report(ig.compile_w4a8_rows(ig.planes_stack(*ig.SHAPES["fc2"]), 90, rows=8, block_n=p.int8_rows_fc2_block_n,
                                    row_scale=True, chunk=p.int8_rows_fc2_chunk))
print("policyrows", r["stack"], r["ops"]["IDP"], r2["stack"], r2["ops"]["IDP"])
print("quantrows", ig.report(ig.compile_quantize_rows_int8(90))["stack"])
r = ig.report(ig.compile_w4a8_rows(ig.planes_stack(*ig.SHAPES["fc2"]), 90, rows=8, block_n=p.int8_rows_fc2_block_n,
                                   row_scale=True, chunk=p.int8_rows_fc2_chunk, norm=True))
print("normrows", r["stack"], r["ops"]["IDP"], r["ops"].get("ATOMG", 0) + r["ops"].get("RED", 0))
c = ig.compile_route_int8(90)
r = ig.report(c)
print("route", r["stack"], c.asm["ptx"].count("mul.rn."), c.asm["ptx"].count("div.rn.f32"), r["ops"]["FRND"])
quant, plain = ig.route_logits_ops(c), ig.route_logits_ops(ig.compile_route_int8(90, quant=False))
print("routelogits", len(quant), int(quant == plain), ig.report(ig.compile_route_int8(90, quant=False))["stack"])
"""


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_w4a8_kernels_compile_for_sm90():
    """The W4A8 kernels' inline PTX only a GPU runs (the interpreter takes their elementwise twins): the prefill GEMM
    on its default tile (64 x 128, ``W x^T``, fc1's gated epilogue) compiles for sm_90 on int8 tensor cores
    (``IGMMA``) without spills and with the unpacked codes kept out of shared memory (no store in the K loop but
    at most one, against 9 as the right operand with Triton 3.6); the
    batched-decode row programs at fc1 (8 rows, 16 weight rows a program) use ``dp4a`` (``IDP``), two a plane word
    (16 words a tile a weight row, 12 tiles: 48 a thread for 4 warps), with conversions by the tile, not by the
    code (24 with Triton 3.6 and 3.9), also as the fused step runs them (``DecodePolicy.int8_rows``: the expert
    read after the wait, fc2's input planes written), and fc2 on them (``int8_rows_fc2``: 32 weight rows a program,
    the routing weight in the epilogue), and both at the CUDA policy's rows a program and tiles a step of their K
    loops (``int8_rows_chunk``, ``int8_rows_fc2_chunk``), the quantizer of fc2's input (``quantize_rows_int8``), and
    fc2 with its last program of a row ending it with the add + norm after it (``int8_rows_fc2_norm``, in the CUDA
    policy since session 51). The MoE's routing kernel that also quantizes its rows to int8 for the W4A8 GEMM
    (``route_top1_int8``, BlackMamba-2.8B's d = 1472 in bf16) compiles without spills, with the quantizer's IEEE
    operations: ``mul.rn`` (not fused into an FMA with the + 0.5), the two ``div.rn`` of the scale and its
    reciprocal, and the floor (``FRND``); its logits, sigmoid and argmax are the plain routing kernel's operations in
    the same order (the routing bit for bit ``route_top1``'s: session 44's several-rows kernel lost that on the GPU
    through a tile layout shared with the quantization), and the plain kernel compiles without spills too."""
    stdout = _compiled("-c", _W4A8_COMPILE.format(bench=str(ROOT / "benchmarks")), timeout=900)
    gemm = next(line.split() for line in stdout.splitlines() if line.startswith("gemm "))
    rows = next(line.split() for line in stdout.splitlines() if line.startswith("rows "))
    steprows = next(line.split() for line in stdout.splitlines() if line.startswith("steprows "))
    route = next(line.split() for line in stdout.splitlines() if line.startswith("route "))
    assert gemm[1] == "0" and int(gemm[2]) >= 4 and int(gemm[3]) <= 1, stdout
    assert rows[1] == "0" and int(rows[2]) >= 48 and int(rows[3]) < 48, stdout
    assert steprows[1] == "0" and steprows[2:] == rows[2:], stdout  # the fused step's: the same loop, no spills
    fc2rows = next(line.split() for line in stdout.splitlines() if line.startswith("fc2rows "))
    assert fc2rows[1] == "0" and int(fc2rows[2]) >= 8, stdout  # fc2 on them (DecodePolicy.int8_rows_fc2)
    # the CUDA policy's rows a program and tiles a step of the K loop (session 48): dp4a, no spills
    policy = next(line.split() for line in stdout.splitlines() if line.startswith("policyrows "))
    assert policy[1] == "0" and int(policy[2]) >= 8 and policy[3] == "0" and int(policy[4]) >= 8, stdout
    # the quantizer of fc2's input (session 48's string default in its row code did not compile with Triton 3.6 and
    # the interpreter did not see it)
    assert next(line.split() for line in stdout.splitlines() if line.startswith("quantrows "))[1] == "0", stdout
    norm = next(line.split() for line in stdout.splitlines() if line.startswith("normrows "))  # int8_rows_fc2_norm
    assert norm[1] == "0" and int(norm[2]) >= 8 and int(norm[3]) >= 1, stdout
    assert route[1] == "0" and int(route[2]) >= 1 and int(route[3]) >= 2 and int(route[4]) >= 1, stdout
    logits = next(line.split() for line in stdout.splitlines() if line.startswith("routelogits "))
    assert int(logits[1]) >= 100 and logits[2] == "1" and logits[3] == "0", stdout  # the plain routing's own code


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_chunked_scan_time_loop_keeps_a_channel_in_one_thread():
    """Compiled for sm_90, the prefill's chunked selective scan holds no shuffle in its time loop at 1, 2 and 4 steps
    a trip, both passes: a channel's states stay in its thread, whatever order Triton's coalescing pass would have
    given a 2-D state tile (the kernel before session 46 compiled to 18-24 shuffles a step at 4 steps a trip with the
    device image's Triton 3.6), and a step costs at most 180 SASS instructions (16 states x 5 is the floor; before:
    227 at 4 steps a trip)."""
    stdout = _compiled(str(ROOT / "benchmarks" / "inspect_scan_kernel.py"), "--steps", "1,2,4", "--batches", "1",
                       "--no-shuffles", timeout=600)
    # "B=1 steps=4 softplus_log2=False main  regs 128  stack 0  per step 168.8  SHFL ..."
    per_step = {tuple(line.split()[1:4]): float(line.split()[10])
                for line in stdout.splitlines() if line.startswith("B=")}
    assert len(per_step) == 12, stdout
    worst = {k: v for k, v in per_step.items() if k[0] != "steps=1" and v > 180}
    assert not worst, stdout
