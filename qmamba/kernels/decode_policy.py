"""The decode kernels' launch choices: :class:`DecodePolicy`, an explicit argument of the decode-step linears
(:mod:`qmamba.kernels.decode_linear`) and of the fused step (:mod:`qmamba.fused_step`, which also passes its settings
for the other decode-step kernels, :mod:`qmamba.kernels.decode_step` and :mod:`qmamba.kernels.w4a8_rows`, to them as
arguments), never module state. :meth:`DecodePolicy.for_device` is the default of a device (the CUDA policy,
:meth:`DecodePolicy.cuda`, with every fusion the GPU timings kept; the CPU one for the interpreter). The field
comments and docstrings record the timings behind each choice (benchmarks/results.md has the runs).
The general matmuls' switches are :class:`qmamba.kernels.matmul_configs.MatmulPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.kernels._triton import HAS_TRITON, next_pow2
from qmamba.kernels.matmul_configs import sm_count
from qmamba.kernels.weights import (FMT_BINARY, FMT_FLOAT, FMT_INT4, FMT_INT4_PLANES, FMT_INT8, BinaryWeight,
                                    PackedWeight, int32_words)

MAX_ROWS = 8  # input rows the decode-step linears take (batched decode up to 8)
INT4_UNPACK = {"shift": 0, "magic": 1, "denorm": 2}  # DecodePolicy.int4_unpack -> the kernels' UNPACK


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that exposes ``gdc_wait``."""
    if not HAS_TRITON or device.type != "cuda":
        return False
    try:
        from triton.language.extra import cuda as tl_cuda  # noqa: F401

        ok = hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")
    except ImportError:
        return False
    return ok and torch.cuda.get_device_capability(device)[0] >= 9


X_IN_TILE_WIDE = ("off", "row_programs", "always")  # DecodePolicy.int4_x_in_tile_wide's settings


@dataclass(frozen=True)
class DecodePolicy:
    """Launch choices of the decode kernels. ``rows_per_program``: output rows a program owns, by ``(format, rows)``
    class (see :meth:`block_n`); ``num_warps`` likewise."""

    pdl: bool = False
    block_n_int4: int = 8
    block_n_float: int = 4
    block_n_binary: int = 16
    block_n_binary_gated: int = 16  # 1-bit gated expert stacks (fc1: gate and up rows, twice the work a row)
    binary_max_rows: int = MAX_ROWS  # batch sizes up to which 1-bit weights take these kernels (routed stacks too)
    num_warps: int = 4
    int4_unpack: str = "shift"   # int4 codes: "shift" down, "magic" (masked in place, input pre-scaled by 16^-p),
    #                              "denorm" (masked in place and read as subnormal floats; CUDA-core paths)
    int4_planes: bool = False    # callers convert int4 weights (group size a multiple of 128) to plane words
    max_rows_planes: int = MAX_ROWS  # batch sizes up to which int4 weights with a plane form take these kernels
    max_rows: int = MAX_ROWS     # batch sizes above this take the general matmul kernels (caller's choice)
    max_rows_routed: int = 0     # routed expert stacks take these kernels up to this many rows even above max_rows
    #                              (one program column per expert: each expert's tile read once for its rows; or,
    #                              with routed_row_programs, one program row per input row)
    planes_mma: bool = True      # plane words at 2+ rows: tensor cores (16-row tiles); False: CUDA cores per row
    min_programs: int = 0        # fewer int4 rows per program where the matrix has too few rows to give this many
    max_programs: int = 0        # twice the int4 / 1-bit rows a program where a (not gated) matrix would take more
    #                              programs than this but at most twice as many (0: never): a grid just past what the
    #                              GPU holds at once runs a second, mostly empty wave (BlackMamba-2.8B int4 at one
    #                              row: in_proj's 1,472 programs against 8 resident a multiprocessor by its registers,
    #                              1,056 on the H200). Session 21 (H200, kernels alone): in_proj 5.20 -> 4.22 us at 8
    #                              rows a program; fc1 (gated) 5.94 -> 8.27 and larger grids (the head) lose, so
    #                              those keep their rows
    int4_x_in_tile: bool = False  # "denorm" int4 at one input row, where a weight row's tiles are fewer words than the
    #                               program has threads x 4 (BlackMamba-2.8B: in_proj, fc1): the input read in the
    #                               tile's [rows, tiles, words] shape by every thread that needs it (from L1) instead
    #                               of read once and broadcast over the rows, which Triton does through shared memory
    #                               with two barriers per nibble position (sm_90 compile: in_proj 21 -> 5 barriers,
    #                               fc1 23 -> 5, for ~1 more instruction per code). On in the CUDA policy (session 17)
    int4_x_in_tile_wide: str = "off"  # int4_x_in_tile also where a weight row's tiles cover the program's threads
    #                               (out_proj, fc2), whose broadcast input the H200 image's Triton 3.6 passes through
    #                               shared memory (23 barriers a program; 3.9 keeps it in registers): "off", "row_
    #                               programs" (the routed row programs of a batch: fc2 at 2+ rows) or "always" (one
    #                               row too). Session 22 (H200, 3 interleaved rounds): "always" took batch 8 from
    #                               1.713 to 1.683 ms/token but batch 1 from 0.522 to 0.529 (kernels alone: out_proj
    #                               4.08 -> 3.26 us, fc2 4.96 -> 4.29): "row_programs" until session 33 (H100,
    #                               with int4_tile_pieces, whose 16 + 8 pieces out_proj then takes: "always" 0.450 ->
    #                               0.443 ms/token at batch 1): "always"
    routed_row_programs: bool = False  # routed rows at 2+ (top-1 MoE, batched decode): one program row per input row
    #                               (grid [M, N / BN]), each the one-row kernel on its own expert's tile (two rows of
    #                               one expert read it twice, the second mostly from L2), instead of one program
    #                               column per expert looping over the rows routed to it
    int4_x_planes: bool = False  # the fused step (one row; routed row programs): add + norm also writes the int4
    #                              input planes of its output (qmamba.quant.layout.INT4_X_PLANES), which int4
    #                              plane-word in_proj / fc1 / head read instead of x: no conversion or scaling of the
    #                              input per code (likewise the SSM update for out_proj, fc1's epilogue for fc2).
    #                              On in the CUDA policy (session 19)
    norm_plane_programs: int = 1  # fused step, with int4_x_planes: programs a row of each add + norm, sharing the
    #                               writing of the planes (qmamba.kernels.decode_step.add_norm's plane_programs)
    expert_prefetch: bool = True  # fused step: fc2 reads its expert's tile before waiting for fc1 (expert_ready)
    norm_in_gemvs: bool = False  # fused step at one row: the add + norm between two layers in the GEMVs around it
    #                              (NormOut in out_proj's / fc2's epilogue, NormIn in in_proj's, fc1's, fc2's, the
    #                              head's prologue and epilogue), not a kernel of its own: 36 launches a BlackMamba-2.8B
    #                              token fewer (the first layer's and a LayerNorm final norm keep theirs)
    norm_in_gemvs_binary: bool = False  # norm_in_gemvs also where a step has 1-bit weights (session 26, H200:
    #                              1-bit + int4 0.571 -> 0.576 ms/token with it, int4 0.522 -> 0.489)
    ssm_block_d: int = 32        # fused step at one row: channels per program of the SSM update kernel
    #                              (dt_state_update; 32: 92 programs for BlackMamba-2.8B's 2944 channels; 8 compiles
    #                              to ~1/3 of the instructions per thread with 4x the programs: the CUDA policy's)
    ssm_block_d_batched: int = 32  # the same at 2+ rows (H200, session 17, batch 8: 32 beat 8 by ~5%; with
    #                              dt_rows_aligned, H100, session 31: 16 beat 32 by ~1%, the CUDA policy's)
    dt_rows_aligned: bool = True  # fused step: the SSM update reads dt_proj's weight with rows padded to a multiple of
    #                              16 elements (qmamba.kernels.decode_step.aligned_rows; a copy where the rank is not:
    #                              BlackMamba-2.8B's 92 -> 96, 10 MB in bf16). Triton then reads a row 8 values a thread,
    #                              16 threads a channel, instead of one value a thread over every thread of the program,
    #                              whose reduction leaves each dt in every thread (each thread then evaluates the
    #                              softplus of all the program's channels). sm_90 compile (Triton 3.6 and 3.9), session
    #                              31: 848 -> 384 SASS instructions a thread at 8 channels a program (one row), 2,032 ->
    #                              840 at 32 (batch 8); 56 -> 40 / 124 -> 96 registers. H100, session 31: the kernel
    #                              3.51 -> 2.77 us (one row), 10.62 -> 6.59 (batch 8); int4 g128 0.511 -> 0.494
    #                              ms/token (one row), 1.630 -> 1.565 (batch 8); bf16 level / 2.059 -> 2.005
    int4_tile_pieces: bool = False  # int4 plane words read from input planes in the tile's shape (int4_x_in_tile;
    #                              one row, or a batch's routed row programs): a weight row whose tile count is not a
    #                              power of two is read as two power-of-two pieces (tile_pieces: BlackMamba-2.8B's 12
    #                              tiles of in_proj / fc1 / head as 8 + 4, not 16 with 4 masked), so that no mask, FMA
    #                              or address of a padding tile is computed. Session 33 (H100): sm_90 compile (Triton
    #                              3.6) in_proj 608 -> 480 SASS instructions a thread (6.6 -> 5.2 a code), the head at
    #                              8 rows a program 352 (4 rows) -> 480 for twice the codes; kernels alone in_proj 4.40
    #                              -> 3.87 us, head 28.20 -> 22.54 (with 8 rows); out_proj, whose input is broadcast
    #                              (16 + 8 pieces: a second pass through shared memory), 4.24 -> 4.49: not split
    planes_joint: bool = False  # int4 input planes: every product of a row (both tile pieces; a gated stack's gate
    #                             and up rows, from one read of the input) before any reduction, and the word sums
    #                             read in the tile's shape where the input is (_rows_out's PLANES_JOINT). sm_90
    #                             compile (Triton 3.6): the same instructions, every input load before the first
    #                             reduction (in_proj: the second piece's loads came after 3 barriers), in_proj 7 -> 5
    #                             barriers, 64 -> 58 registers, fc1 13 -> 11, 90 -> 80, no spills, where plane 8
    #                             (the word sums) is given. Alone it loses (H100, session 37, int4 g128 batch 1 0.441
    #                             -> 0.447 ms/token; kernels alone in_proj 3.83 -> 3.54 us, fc1 5.94 -> 6.45): on in
    #                             the CUDA policy with producer_word_sums, at one row (planes_joint_batched off)
    planes_joint_batched: bool = True  # planes_joint also in a batch's routed row programs (H100, session 37, batch
    #                             8: 1.425 -> 1.444 ms/token with it, 1.439 with producer_word_sums too): off in the
    #                             CUDA policy
    planes_joint_gated: bool = True  # planes_joint also for a gated stack (fc1: gate and up rows from one read of the
    #                             input). Kernels alone (session 37, word sums in plane 8) fc1 took 6.45 us joint
    #                             against 5.94. H100, session 38 (bench_decode.py --variants default,jointng,nowsums,
    #                             5 interleaved rounds): int4 g128 batch 1 0.432 -> 0.422 ms/token without it: off in
    #                             the CUDA policy
    producer_word_sums: bool = False  # fused step at one row with norm_in_gemvs: the producers of int4 input planes
    #                             (NormOut in out_proj / fc2, the SSM update, fc1's epilogue) also add their words' sums
    #                             (plane 8's values) into a row per call by relaxed atomic adds (zeroed with the norm
    #                             sums by the first add + norm), and each consumer reads that row instead of summing
    #                             its words from the planes (8 more loads a piece and a pass through shared memory).
    #                             sm_90 compile (Triton 3.6), the step's five GEMVs with planes_joint: SASS a thread /
    #                             barriers in_proj 608 / 7 -> 544 / 5, out_proj 632 / 8 -> 560 / 5, fc1 968 / 13 -> 904
    #                             / 11, fc2 752 / 8 -> 704 / 6, head 544 / 7 -> 480 / 5. On in the CUDA policy, with
    #                             planes_joint: H100, session 37 (bench_decode.py --variants default,wsums), int4 g128
    #                             batch 1 0.441 -> 0.434 ms/token (a second call, 5 rounds: 0.444 -> 0.435)
    early_reads: bool = False  # fused step: what a kernel reads that was written two launches or more before it is
    #                             read before its programmatic-dependent-launch wait, with its weights (the launch
    #                             before it waited for the one before that before letting it start): the SSM update's
    #                             x, z, SSM and conv states (only x_proj's output after the wait; the states come
    #                             from DRAM, last written a token ago) and, at one row, in_proj's conv state and
    #                             weights (read in its epilogue otherwise). On in the CUDA policy: H100, session 38
    #                             (bench_decode.py --variants default,early, 3-5 interleaved rounds), batch 1: int4
    #                             g128 0.423 -> 0.416 ms/token, bf16 0.629 -> 0.618, 1-bit + int4 0.549 -> 0.535, int4
    #                             as quantize writes it 0.446 -> 0.436; batch 8 level (int4 1.424 -> 1.419, bf16 1.924
    #                             -> 1.947 within its spread of 0.044)
    pdl_general: bool = False  # fused step, with pdl: what runs on the general kernels (batch 2+: the dense matrices
    #                             on dequant_matmul's small-M kernel, 1-bit matrices on binary_matmul's, the conv step
    #                             and a general fc1's activation on their own) launched as programmatic dependents
    #                             too, each waiting for the kernel before it before reading anything (the conv step
    #                             reads its old state and weights before), so that the graph's chain of early
    #                             launches is not broken four times a Mamba layer; the prefill paths launch as usual.
    #                             On in the CUDA policy: H100, session 39 (bench_decode.py --variants default,pdlgen,
    #                             5 interleaved rounds), batch 8: int4 g128 1.400 -> 1.334 ms/token, bf16 1.910 ->
    #                             1.849; a second call: int4 1.408 -> 1.334, bf16 1.958 -> 1.865, int4 as quantize
    #                             writes it 1.399 -> 1.323, 1-bit + int4 1.763 -> 1.615 (3 rounds)
    general_early_tile: bool = False  # with pdl_general: the small-M kernel of a dense matrix of int4 plane words
    #                             reads each program's first K tile of the weight before its wait (BlackMamba-2.8B at
    #                             batch 8: in_proj's, x_proj's and out_proj's programs have 3 tiles each; sm_90,
    #                             Triton 3.6: 80 -> 92 registers, no spills). On in the CUDA policy: H100, session 39
    #                             (--variants default,etile, 5 rounds), int4 g128 batch 8 1.334 -> 1.314 ms/token
    int8_rows: bool = False  # fused step at 2+ rows, for a model whose MoE takes int8 activations
    #                             (``model.int8_activations``, decided by ``qmamba quantize``'s check): a gated routed
    #                             fc1 of int4 plane words (groups a multiple of 128) on the W4A8 row programs
    #                             (qmamba.kernels.w4a8_rows: int8 codes against plane words with dp4a), its input
    #                             quantized to int8 per row by the add + norm before it (which then writes no int4
    #                             input planes for it); fc1's epilogue still writes fc2's input planes. H100, session
    #                             43 (bench_decode.py --variants default,int8rows, 5 rounds, two calls): int4 g128
    #                             batch 8 1.310 -> 1.234 ms/token, but the float32 token check against the rounding
    #                             twin failed on the random-weight model (see benchmarks/results.md). Session 44
    #                             (H100, 3 rounds): 1.311 -> 1.233, and the check with the rounding taken out (the
    #                             twin multiplies the step's own int8 codes, qmamba.bench.same_codes_reference)
    #                             passes with no tie. Session 46 (H100, 3 rounds): 1.312 -> 1.234 with `qmamba
    #                             bench`'s check (qmamba.bench.check_decode) passing through that fallback (0 ties):
    #                             on in the CUDA policy since.
    int8_rows_block_n: int = 16  # with int8_rows: fc1's weight rows a program (gate and up rows together; 32 in the
    #                              CUDA policy since session 48, with int8_rows_chunk: see there)
    int8_rows_fc2: bool = False  # with int8_rows: fc2 too on the W4A8 row programs, its input (fc1's output) quantized
    #                               to int8 per row by a launch of its own between them (fc1 then writes no input
    #                               planes for it: the planes' float32 rows, ~18 KB a row re-read by each of fc2's
    #                               programs, bound fc2 by cache traffic at batch 8). The rounding is the one the
    #                               W4A8 prefill applies and qmamba quantize's int8 check measured (both expert
    #                               inputs); the reference twin rounds it too (QuantExperts.int8_step_fc2).
    #                               Session 46 (H100, batch 8, 3 rounds): 1.247 ms/token (1.237 with 16 rows a
    #                               program, 1.272 with 64) against 1.234 with fc1 alone on int8 codes: left off
    #                               then; on in the CUDA policy since session 48, with int8_rows_fc2_chunk (see there)
    int8_rows_fc2_block_n: int = 32  # with int8_rows_fc2: fc2's weight rows a program
    int8_rows_fc2_norm: bool = False  # with int8_rows_fc2: no add + norm launch after an MoE layer whose next add +
    #                              norm is a plain one (no router, planes or int8 codes: the next layer a Mamba one,
    #                              or the final norm); the last of fc2's programs of a row to finish ends the row with
    #                              it (w4a8_rows' out_norm). Built in session 49; H100, session 51 (bench_decode.py
    #                              int4 g128 batch 8, 3 rounds): 1.012 -> 1.004 ms/token, on in the CUDA policy since
    #                              (session 48's fold of fc2's input quantizer into fc1's last programs lost: 1.023,
    #                              1.056 with both, and was removed)
    int8_rows_chunk: int = 1     # with int8_rows: 128-column tiles a step of fc1's K loop (w4a8_rows' chunk: every
    #                              operand of the next step loaded before this one's products, so that a program
    #                              waits on tiles / chunk dependent loads instead of one a tile)
    int8_rows_fc2_chunk: int = 1  # with int8_rows_fc2: the same for fc2 (K 3,872: 31 tiles, a chain of 31 dependent
    #                              loads a program at 1: ~0.6 us a tile, the kernel's whole time). H100, session 48,
    #                              kernels alone at 8 rows (bench_decode_linear.py --rows 8, random routing over 8
    #                              experts), us: fc2 17.65 (16 rows a program, 1 tile a step) -> 10.84 (16 rows, 4
    #                              tiles) / 10.00 (32 rows, 4) / 8.61 (32 rows, 8), against 21.92 for the float
    #                              routed row programs; fc1 18.85 -> 16.54 (16, 4) / 14.46 (32, 4) / 18.49 (32, 8).
    #                              In the step (bench_decode.py, int4 g128 batch 8, 3 rounds, fp32 greedy tokens equal
    #                              to the twin fed the step's own int8 codes, 0 ties): 1.254 ms/token (session 47's
    #                              policy) -> 1.181 with fc1 at 4 tiles a step -> 1.032 with fc2 on int8 codes at 4 or
    #                              8 tiles a step -> 1.001 with 32 fc1 rows a program (1.241 for session 47's policy
    #                              in that run; bf16 1.825): the CUDA policy's (fc1 32 rows, 4 tiles; fc2 32, 8)
    formats: tuple = (FMT_FLOAT, FMT_INT8, FMT_INT4, FMT_INT4_PLANES, FMT_BINARY)  # weight formats these kernels serve

    def __post_init__(self):
        if self.int4_x_in_tile_wide not in X_IN_TILE_WIDE:
            raise ValueError(f"DecodePolicy: int4_x_in_tile_wide must be one of {X_IN_TILE_WIDE}, "
                             f"got {self.int4_x_in_tile_wide!r}")

    def takes(self, weight, rows: int, routed: bool = False) -> bool:
        """Whether a caller should run ``weight`` at ``rows`` rows through :func:`decode_linear` (int4 plane words up
        to ``max_rows_planes`` rows: the tensor-core path from 2 rows; everything else up to ``max_rows``; a
        ``routed`` expert stack also up to ``max_rows_routed``)."""
        if not isinstance(weight, (PackedWeight, BinaryWeight)) or weight.fmt not in self.formats:
            return False
        if isinstance(weight, BinaryWeight) and not binary_decodable(weight):
            return False
        limit = self.max_rows_planes if weight.fmt == FMT_INT4_PLANES else self.max_rows
        if routed:
            limit = max(limit, self.max_rows_routed)
        if weight.fmt == FMT_BINARY:
            limit = min(limit, self.binary_max_rows)
        return rows <= min(limit, MAX_ROWS)

    @classmethod
    def for_device(cls, device) -> "DecodePolicy":
        """CUDA: what measured fastest on the H200 (benchmarks/results.md, "Decode step, session 11", "Session
        13" and "Session 16"): these kernels at batch 1 for float weights (0.577 ms/token for bf16 BlackMamba-2.8B,
        session 16), for int8 weights (0.537 against 1.085 on the general kernels, session 16) and for int4 weights
        of group size 128 / 256 as plane words, 4 rows per program (0.660 against 0.994 on the general kernels),
        codes read as subnormal floats ("denorm") with at least two programs a multiprocessor for every matrix (264
        on the H200: 0.591 against 0.685 for shifted codes, session 13); int4 in the stored word layout stays on the
        general kernels, and so does every format at batch 2+ (the plane tiles' tensor-core path spills at the
        expert shapes). 1-bit weights stayed on the general kernels until session 20: on these kernels (sign flips
        per bit position) the 1-bit + int4 step took 1.381 ms/token against 0.946 (session 16, ``bench_decode.py
        --variants default,fmts+binary``). Session 17
        (``--variants default,xtile,ssmbd8,ssmbd16``, one run): the input of in_proj / fc1's int4 codes read in the
        tile's shape (``int4_x_in_tile``) took int4 g128 from 0.587 to 0.554 ms/token, 8 channels per program of
        the SSM update (``ssm_block_d``) int4 to 0.575 and bf16 from 0.585 to 0.559: both on. At batch 8 32 channels
        stay (``ssm_block_d_batched``: int4 2.075 against 2.169 ms/token, bf16 1.755 against 1.850).
        Session 18 (``--variants default,rt8,rt8rw,rw``, one run): the routed expert stacks at batch 2-8 on these
        kernels, one program row per input row (``max_rows_routed``, ``routed_row_programs``): batch 8 int4 2.138
        -> 1.792 ms/token, bf16 1.793 -> 1.675 (fc1 alone 47.9 -> 34.5 us, fc2 31.2 -> 20.2; batch 1 unchanged);
        on: the warps of one weight row instead (``rw``, a knob removed since) lost at batch 1 (0.607 against 0.531).
        Session 19 (``--variants default,xplanes,xplanesb``, one run): the int4 input planes from their producers
        (``int4_x_planes``) left batch 1 where it was (0.529 both) and took batch 8 from 1.797 to 1.724 ms/token
        (bf16, which has none, 1.898 / 1.878): on. Kernels alone at one row (``bench_decode_linear.py``): in_proj
        5.85 -> 5.11 us, fc1 6.17 -> 5.94, fc2 5.32 -> 4.89, head 36.2 -> 28.2, out_proj 3.79 -> 4.04; the add +
        norm that writes the planes from one program gives most of it back at batch 1.
        Session 20 (``--formats binary+int4_g128 --variants default,bin16,bin16g4,bin16g8,bin8g4,bin16g4r8``, one
        run): 1-bit weights at batch 1 on these kernels with the "denorm" reading (bits masked in place as subnormal
        floats against alpha_denorm, :func:`qmamba.quant.layout.binary_denorm_vectors`), 16 rows a program (8 for
        fc1 by the program floor): 1-bit + int4 0.865 -> 0.593 ms/token; 4 rows for fc1 lost (0.661); at batch 8
        the routed 1-bit stacks stay on the general kernels (2.149 against 2.438 on the row programs):
        ``binary_max_rows`` 1.
        Session 21 (``--variants normp1,normp2,normp4 --rounds 3``, then ``default,maxp0``; medians of interleaved
        rounds): the int4 input planes of each add + norm written by 4 programs a row (``norm_plane_programs``):
        int4 g128 0.527 -> 0.522 ms/token at batch 1, 1.729 -> 1.710 at batch 8 (bf16, which has no planes,
        unchanged); in_proj at 8 int4 rows a program (``max_programs``: 736 programs, one wave at 8 a
        multiprocessor, instead of 1,472): 0.526 -> 0.524 (kernel alone 5.20 -> 4.22 us; fc1, gated, lost at 8
        rows: 5.94 -> 8.27, so gated matrices keep theirs).
        Session 22 (``--variants default,xtilewide --rounds 3``): out_proj / fc2 reading the input planes in the
        tile's shape (``int4_x_in_tile_wide``) at one row lost at batch 1 (0.522 -> 0.529) and won at batch 8 (1.713
        -> 1.683), where only fc2's routed row programs are one-row kernels: "row_programs".
        Session 26 (``--variants default,normgemv --rounds 3``): the add + norm between layers in the GEMVs around
        it at one row (``norm_in_gemvs``: 146 -> 110 launches a token) took int4 g128 from 0.522 to 0.489 ms/token
        and bf16 from 0.576 to 0.538 (with its sums added by relaxed atomics; acq_rel ones, Triton's default, fence
        every store first and gave nothing: 0.521 -> 0.523): on, but for steps with 1-bit weights (1-bit + int4
        0.571 -> 0.576: ``norm_in_gemvs_binary`` off).
        Session 31 (H100, ``--variants default,dtrows0`` and ``default,ssmbd16,ssmbd64`` at batch 8, 3-5 interleaved
        rounds): dt_proj's rows padded for the SSM update (``dt_rows_aligned``) took int4 g128 from 0.511 to 0.494
        ms/token at batch 1 and 1.630 to 1.565 at batch 8 (bf16 level at batch 1, 2.059 -> 2.005 at batch 8), and 16
        channels a program at batch 2+ (``ssm_block_d_batched``) int4 from 1.562 to 1.544 (64: 1.544; bf16 level):
        both on.
        Session 33 (H100, ``--variants default,nopieces``, 3 interleaved rounds): int4 rows of 12 tiles read as 8 + 4
        where the input is read in the tile's shape (``int4_tile_pieces``) and 8 int4 rows a program (fc1 and the
        head; in_proj had 8 by ``max_programs``, out_proj / fc2 keep 4 by ``min_programs``): int4 g128 0.492 ->
        0.451 ms/token at batch 1, 1.539 -> 1.460 at batch 8 (1-bit + int4 0.553 -> 0.548; bf16 unchanged): on;
        then (``--variants default,xtilewide``) out_proj / fc2 reading their input planes in the tile's shape at one
        row too (``int4_x_in_tile_wide`` "always"; out_proj in 16 + 8 pieces) 0.450 -> 0.443 at batch 1: on.
        Session 37 (H100, ``--variants default,joint,wsums``, 3 interleaved rounds): the producers of the int4 input
        planes adding their word sums for the consumers (``producer_word_sums``) with every product of a row before
        any reduction (``planes_joint``) took int4 g128 from 0.441 to 0.434 ms/token at batch 1 (``planes_joint``
        alone 0.447; 5 rounds in a second call: 0.444 -> 0.435); at batch 8, where only the routed row programs
        read planes, 1.425 -> 1.439 (alone 1.444): on at one row (``planes_joint_batched`` off).
        Session 38 (H100, ``--variants default,jointng,nowsums``, 5 interleaved rounds): fc1 (the gated stack)
        without the joint products (``planes_joint_gated`` off) 0.432 -> 0.422 ms/token at batch 1: off. Tried and
        removed (commit 2f75220 has the code): x_proj in in_proj's epilogue, each program of x rows adding its
        channels' share of ``xc @ W_x^T`` (the weight read before the wait) into 1 or 8 zeroed rows by atomic adds
        and the SSM update reading their sum (18 launches a token fewer): 0.424 -> 0.441 / 0.529 ms/token (bf16
        0.634 -> 0.680 / 0.670; x_proj float as ``qmamba quantize`` writes it, 0.446 -> 0.556). As in session 21 (one
        row, the weight read after the wait: 0.528 -> 0.559 on the H200), the epilogue's products and atomics on
        in_proj's tail cost more than the launch, whose weight loads and start overlap the kernel before it. Then
        (``--variants default,early``, 5 rounds; 3 for 1-bit + int4 and int4 as ``qmamba quantize`` writes it): what a
        kernel reads that was written two launches or more before it, read before its wait (``early_reads``: the
        SSM update's x, z and states, in_proj's conv operands) took batch 1 from 0.423 to 0.416 ms/token (bf16 0.629
        -> 0.618, 1-bit + int4 0.549 -> 0.535, int4 as quantize writes it 0.446 -> 0.436), batch 8 level: on.
        Session 39 (H100, ``--variants default,enorm``, then at batch 8 ``default,pdlgen,rpbn8`` and
        ``default,nopdlgen,etile``, 5 interleaved rounds): out_proj's NormOut reads before the wait (session 38's
        ``early_norm_out``) left batch 1 level (0.414 against 0.416 with it): removed (commit 1ab1307 has it); 8 int4
        rows a routed row program (fc2 1,472 programs instead of 2,944) lost at batch 8 (1.400 -> 1.508, though fc2
        alone went 21.27 -> 19.81 us): removed; the batched step's general kernels (dense matrices, conv step, 1-bit
        matrices, a general fc1's activation) as programmatic dependents (``pdl_general``) took batch 8 from 1.400 to
        1.334 ms/token (bf16 1.910 -> 1.849, 1-bit + int4 1.763 -> 1.615) and the dense int4 matrices' first weight
        tile before the wait (``general_early_tile``) to 1.314: both on. Sessions 43-46: fc1 on int8 codes
        (``int8_rows``), 1.310 -> 1.234: on. Session 48 (H100, ``--variants default,int8c1,int8bn32c4fc2c8``): the
        W4A8 row programs several tiles a step of their K loop (``int8_rows_chunk``, ``int8_rows_fc2_chunk``) and fc2
        on int8 codes too (``int8_rows_fc2``): batch 8 1.241 -> 1.001 ms/token (bf16 1.825): on.
        CPU (interpreter): every format and batch, wide row blocks (few programs)."""
        if device.type != "cuda":
            return cls(pdl=False, block_n_int4=64, block_n_float=64, num_warps=1, ssm_block_d=16)
        return cls.cuda(sm_count(device), pdl_supported(device))

    @classmethod
    def cuda(cls, multiprocessors: int, pdl: bool) -> "DecodePolicy":
        """The CUDA policy of :meth:`for_device` for a GPU of ``multiprocessors`` SMs (no device needed: offline
        compiles and reports build it for the H200's 132)."""
        return cls(pdl=pdl, max_rows=1, max_rows_planes=1, block_n_int4=8, int4_planes=True, int4_unpack="denorm",
                   min_programs=2 * multiprocessors, int4_x_in_tile=True, ssm_block_d=8,
                   max_rows_routed=MAX_ROWS, routed_row_programs=True, int4_x_planes=True, binary_max_rows=1,
                   norm_plane_programs=4, max_programs=8 * multiprocessors, int4_x_in_tile_wide="always",
                   norm_in_gemvs=True, ssm_block_d_batched=16, int4_tile_pieces=True, planes_joint=True,
                   planes_joint_batched=False, planes_joint_gated=False, producer_word_sums=True, early_reads=True,
                   pdl_general=True, general_early_tile=True, int8_rows=True, int8_rows_block_n=32,
                   int8_rows_chunk=4, int8_rows_fc2=True, int8_rows_fc2_chunk=8, int8_rows_fc2_norm=True,
                   formats=(FMT_FLOAT, FMT_INT8, FMT_INT4_PLANES, FMT_BINARY))

    def int8_rows_block_n_for(self, block_n: int, rows: int, n: int) -> int:
        """Weight rows a W4A8 row program (``int8_rows_block_n`` / ``int8_rows_fc2_block_n``, given as ``block_n``) at
        ``rows`` input rows of an ``n``-row weight: halved, to 8 at least, while the grid (a program row per input
        row) would have fewer than ``min_programs`` programs. BlackMamba-2.8B on the CUDA policy (264): unchanged at
        batch 8 (fc2 368 programs of 32 rows), fc2 at 16 rows from batch 4 down, 8 at batch 2 (92 programs of 32 rows
        otherwise: under one a multiprocessor). Timed at batch 8 only (session 48); the floor follows the decode
        kernels' own (:meth:`block_n`)."""
        while block_n > 8 and self.min_programs and rows * -(-n // block_n) < self.min_programs:
            block_n //= 2
        return block_n

    @property
    def denorm_reading(self) -> bool:
        """Codes read as subnormal floats (``int4_unpack`` "denorm"): int4 nibbles, and 1-bit weights against their
        :func:`binary_denorm_of` vectors."""
        return INT4_UNPACK[self.int4_unpack] >= INT4_UNPACK["denorm"]

    def block_n(self, fmt: int, rows: int, n: int, gated: bool = False) -> int:
        int4 = fmt in (FMT_INT4, FMT_INT4_PLANES)
        packed = int4 or fmt == FMT_BINARY  # narrow rows: fewer per program where programs would be too few
        binary = self.block_n_binary_gated if gated else self.block_n_binary
        bn = self.block_n_int4 if int4 else binary if fmt == FMT_BINARY else self.block_n_float
        bn = max(1, bn // (1 if rows <= 2 else 2 if rows <= 4 else 4))
        if packed and self.max_programs and not gated and self.max_programs < -(-n // bn) <= 2 * self.max_programs:
            bn *= 2
        if packed and self.min_programs:
            while bn > 1 and -(-n // bn) < self.min_programs:
                bn //= 2
        return min(bn, next_pow2(n))


def binary_words(weight: BinaryWeight):
    """The sign words ``[E, N, K / 32]`` int32 the decode kernels read, or None where they do not take this 1-bit
    weight (a per-row scale, K not a multiple of 32, signs not viewable as aligned 32-bit words)."""
    if weight.row_scale is not None or weight.k % 32:
        return None
    return int32_words(weight.qweight)


def binary_decodable(weight: BinaryWeight) -> bool:
    """Whether the decode kernels take this 1-bit weight (see :func:`binary_words`)."""
    return binary_words(weight) is not None
