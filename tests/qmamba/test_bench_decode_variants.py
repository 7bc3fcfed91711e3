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
