"""benchmarks/bench_decode.py's policy variants, the names behind the decode A/B figures of benchmarks/results.md:
each parses to the policy it documents (no GPU needed), an unknown name is refused."""

import sys
from pathlib import Path

import pytest

from qmamba.kernels.decode_linear import DecodePolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_decode import policy_variant  # noqa: E402

CUDA = DecodePolicy.cuda(132, True)


def test_x_in_tile_wide_variants():
    assert CUDA.int4_x_in_tile_wide == "row_programs"
    assert policy_variant(CUDA, "xtilewide").int4_x_in_tile_wide == "always"
    assert policy_variant(CUDA, "xtilewide0").int4_x_in_tile_wide == "off"


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown policy variant"):
        policy_variant(CUDA, "xtilewidex")


def test_persistent_variants():
    p = policy_variant(CUDA, "persist")
    assert p.persistent and p.persistent_prefetch and p.persistent_programs == 0 and p.block_n_int4 == CUDA.block_n_int4
    p = policy_variant(CUDA, "persist_bn16_p264_nopf_normp1_r128")
    assert (p.persistent, p.block_n_int4, p.persistent_programs, p.persistent_prefetch, p.norm_plane_programs,
            p.persistent_maxnreg) == (True, 16, 264, False, 1, 128)
    assert not CUDA.persistent
    with pytest.raises(SystemExit, match="unknown part"):
        policy_variant(CUDA, "persist_bnx")
