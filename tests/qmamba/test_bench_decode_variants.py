"""benchmarks/bench_decode.py's policy variants, the names behind the decode A/B figures of benchmarks/results.md:
each parses to the policy it documents (no GPU needed), an unknown name is refused."""

import dataclasses
import sys
from pathlib import Path

import pytest

from qmamba.kernels.decode_linear import DecodePolicy
from qmamba.kernels.matmul_configs import DEFAULT_POLICY

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_decode import matmul_variant, policy_variant  # noqa: E402

CUDA = DecodePolicy.cuda(132, True)


def test_routed_gemm_variants():
    assert policy_variant(CUDA, "rgemm") == dataclasses.replace(CUDA, routed_gemm_rows=2)
    assert policy_variant(CUDA, "rgemm128w8").routed_gemm_tile == (128, 8, 3)
    assert policy_variant(CUDA, "rgemm32s4").routed_gemm_tile == (32, 4, 4)
    assert matmul_variant("rgemm") == DEFAULT_POLICY


def test_dense_small_m_gemm_variants():
    assert policy_variant(CUDA, "dgemm") == CUDA  # the general kernels' policy only
    assert matmul_variant("dgemm").small_m_gemm_tile == (64, 4, 3, 1)
    assert matmul_variant("dgemm32w8k2").small_m_gemm_tile == (32, 8, 3, 2)
    assert matmul_variant("default") == DEFAULT_POLICY and DEFAULT_POLICY.small_m_gemm_tile is None


def test_x_in_tile_wide_variants():
    assert CUDA.int4_x_in_tile_wide == "row_programs"
    assert policy_variant(CUDA, "xtilewide").int4_x_in_tile_wide == "always"
    assert policy_variant(CUDA, "xtilewide0").int4_x_in_tile_wide == "off"


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown policy variant"):
        policy_variant(CUDA, "rgemmx")
