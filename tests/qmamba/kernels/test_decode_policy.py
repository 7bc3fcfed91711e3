"""The decode kernels' launch policy (qmamba/kernels/decode_policy.py): the CPU policy, rows a program by format
and grid size, and which weights the decode kernels take."""

import torch

from qmamba.kernels.decode_policy import MAX_ROWS, DecodePolicy, binary_decodable
from qmamba.kernels.weights import BinaryWeight


def test_policy_is_explicit_and_cpu_has_no_pdl():
    cpu = DecodePolicy.for_device(torch.device("cpu"))
    assert cpu.pdl is False
    assert DecodePolicy(block_n_int4=8).block_n(2, 1, 5888) == 8
    assert DecodePolicy(block_n_int4=8).block_n(2, 8, 5888) == 2
    assert DecodePolicy(block_n_int4=8).block_n(2, 1, 3) == 4  # never wider than the matrix (next power of two)
    # max_programs: twice the rows a program for a grid just past it (up to twice as many programs), not gated,
    # int4 / 1-bit only
    wave = DecodePolicy(block_n_int4=4, max_programs=1056, min_programs=264)
    assert [wave.block_n(3, 1, n) for n in (5888, 1472, 50304)] == [8, 4, 4]  # in_proj, out_proj, a head
    assert wave.block_n(3, 1, 5888, gated=True) == 4  # fc1's gate and up rows: twice the work a row already
    assert wave.block_n(0, 1, 5888) == DecodePolicy().block_n_float  # float weights keep their rows


def test_binary_weights_the_decode_kernels_take():
    """1-bit weights as sign words: K a multiple of 32 and no per-row scale; else the general kernels."""
    def signs(k, row_scale=None):
        return BinaryWeight(qweight=torch.zeros(1, 4, k // 8, dtype=torch.uint8), alpha=torch.ones(1, k),
                            beta=torch.zeros(1, k), row_scale=row_scale, n=4, k=k)

    policy = DecodePolicy()
    assert binary_decodable(signs(64)) and policy.takes(signs(64), 1)
    assert not policy.takes(signs(64), MAX_ROWS + 1)
    assert not binary_decodable(signs(40))  # 40 columns: not whole 32-bit words
    assert not binary_decodable(signs(64, row_scale=torch.ones(1, 4)))
    assert not policy.takes(signs(40), 1)


def test_int8_rows_block_n_keeps_the_grid_at_the_program_floor():
    """The W4A8 row programs' weight rows a program are halved (to 8 at least) while the grid, a program row per input
    row, would have fewer than ``min_programs`` programs: BlackMamba-2.8B's fc2 (1,472 rows) on the CUDA policy of a
    132-multiprocessor GPU keeps 32 rows at batch 8 (368 programs), takes 16 at batch 4 and 8 at batch 2; fc1 (7,744
    gate and up rows) keeps 32 from batch 2. No floor (the CPU policy): unchanged."""
    cuda = DecodePolicy.cuda(132, True)
    assert cuda.min_programs == 264
    assert [cuda.int8_rows_block_n_for(32, rows, 1472) for rows in (8, 4, 2)] == [32, 16, 8]
    assert cuda.int8_rows_block_n_for(32, 2, 7744) == 32
    assert cuda.int8_rows_block_n_for(32, 1, 64) == 8  # never below 8
    assert DecodePolicy(min_programs=0).int8_rows_block_n_for(32, 2, 1472) == 32
