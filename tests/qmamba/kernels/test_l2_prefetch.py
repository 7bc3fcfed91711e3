"""The host side of the L2 prefetch (qmamba.kernels.l2_prefetch): the chunk each warp asks for covers the range in
16-byte pieces, and a weight's range is its stored words, aligned. (The prefetch itself is inline assembly: its PTX is
checked in test_decode_compiles.py, its effect on results by the GPU run of the fused step.)"""

import pytest
import torch

from qmamba.kernels.l2_prefetch import PREFETCH_ALIGN, prefetch_chunk, prefetch_range
from qmamba.kernels.weights import PackedWeight


@pytest.mark.parametrize("nbytes,programs,warps", [(4_333_568, 1472, 4), (16, 1000, 4), (2_170_000 // 16 * 16, 31, 4),
                                                   (1 << 24, 368, 8)])
def test_prefetch_chunk_covers_the_range(nbytes, programs, warps):
    chunk = prefetch_chunk(nbytes, programs, warps)
    assert chunk % PREFETCH_ALIGN == 0 and chunk > 0
    assert chunk * programs * warps >= nbytes  # every byte is some warp's
    assert (chunk - PREFETCH_ALIGN) * programs * warps < nbytes  # and no larger than it must be


def test_prefetch_range_is_the_stored_words():
    words = torch.zeros(3, 40, 13, dtype=torch.int32)  # 6240 bytes: 6240 // 16 * 16 = 6240
    w = PackedWeight(fmt=3, n=40, k=13 * 8, n_experts=3, qweight=words)
    t, nbytes = prefetch_range(w)
    assert t is words and nbytes == 6240
    small = PackedWeight(fmt=0, n=3, k=3, n_experts=1, qweight=torch.zeros(1, 3, 3, dtype=torch.bfloat16))
    assert prefetch_range(small)[1] == 16  # 18 bytes: the last 2 are left to the kernel's own loads
    shifted = torch.zeros(1, 4, 65, dtype=torch.bfloat16)[:, :, 1:]  # off the 16-byte grid, and strided
    assert prefetch_range(PackedWeight(fmt=0, n=4, k=64, n_experts=1, qweight=shifted)) is None
    assert prefetch_range(PackedWeight(fmt=0, n=4, k=64, n_experts=1, qweight=shifted.contiguous()[:, :, :])) \
        is not None
