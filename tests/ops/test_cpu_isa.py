"""The CPU instruction set choice (csrc/common/cpu_features.cpp, ops.set_cpu_isa): a name caps it
(also above the verified level: an explicit opt-in), the CPU caps it further, and "auto" is the
start-up default: DSV3_CPU_ISA's value, else the highest instruction set verified on a real CPU
(AVX2: the AVX-512 and AMX kernels have not yet run on such a CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops
from tests.harness.tensors import poisoned
from tests.ops.test_gemm import check, lhs, ref_nt, rhs

ORDER = ["portable", "avx2", "avx512", "amx"]
HIGHEST_VERIFIED = "avx2"  # kHighestVerifiedIsa in cpu_features.cpp
REPO = Path(__file__).resolve().parents[2]


def capped(name: str) -> str:
    """What the CPU can run of `name`."""
    return ORDER[min(ORDER.index(name), ORDER.index(ops.detected_cpu_isa()))]


def test_auto_stops_at_the_env_choice_or_the_highest_verified_isa() -> None:
    env = os.environ.get("DSV3_CPU_ISA")
    default = env if env in ORDER else HIGHEST_VERIFIED
    try:
        ops.set_cpu_isa("portable")
        assert ops.set_cpu_isa("auto") == capped(default)
        assert ops.cpu_isa() == capped(default)
    finally:
        ops.set_cpu_isa("auto")


def test_a_named_isa_is_used_up_to_what_the_cpu_has() -> None:
    try:
        for name in ORDER:
            assert ops.set_cpu_isa(name) == capped(name), name
            assert ops.cpu_isa() == capped(name), name
    finally:
        ops.set_cpu_isa("auto")


def test_dsv3_cpu_isa_sets_the_default_that_auto_restores() -> None:
    # One fresh process per value (the variable is read once, at start-up), run side by side. (A
    # name above the verified level, DSV3_CPU_ISA=avx512, is how bench/gpu_check.sh runs these
    # tests on an AVX-512 host: the first test above then checks it in this process.)
    cases = {"portable": "portable", "sse9": HIGHEST_VERIFIED}
    code = "import ops; print(ops.cpu_isa(), ops.set_cpu_isa('avx2'), ops.set_cpu_isa('auto'))"
    procs = {
        env: subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "DSV3_CPU_ISA": env},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in cases
    }
    for env, default in cases.items():
        stdout, stderr = procs[env].communicate(timeout=120)
        assert procs[env].returncode == 0, (env, stderr)
        assert stdout.split() == [capped(default), capped("avx2"), capped(default)], (env, stdout)
        assert ("ignoring DSV3_CPU_ISA" in stderr) == (env == "sse9"), (env, stderr)


@pytest.mark.skipif(ops.detected_cpu_isa() not in ("avx512", "amx"), reason="this CPU has no AVX-512")
@pytest.mark.parametrize("m,n,k", [(130, 300, 700), (420, 1408, 300), (101, 530, 385)])
def test_avx512_packed_path_gives_the_avx2_bits(m: int, n: int, k: int) -> None:
    # The AVX-512 decode is exact and its micro-kernel does the AVX2 one's FMAs in the same order
    # per output: the packed path (M > 16) must agree bit for bit, not just within tolerance.
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    out = {}
    try:
        for isa in ("avx2", "avx512"):
            assert ops.set_cpu_isa(isa) == isa
            out[isa] = poisoned(m, n, dtype=torch.float32)
            ops.fp8_gemm_nt((a, sa), (b, sb), out[isa])
    finally:
        ops.set_cpu_isa("auto")
    check(out["avx512"], ref_nt(a, sa, b, sb))
    assert torch.equal(out["avx512"], out["avx2"])


@pytest.mark.skipif(ops.detected_cpu_isa() != "amx", reason="this CPU has no AMX")
@pytest.mark.parametrize("m,n,k", [(130, 300, 700), (17, 1408, 300), (101, 530, 385), (64, 64, 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_amx_packed_path_agrees_with_the_reference_and_avx512(m: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    # The AMX path (M > 16) multiplies the same exact values (e4m3 -> bf16 is exact) and sums each
    # 128-K block in FP32 tiles: within the GEMM tolerance of float64, and within FP32 rounding of
    # the AVX-512 path (the hardware's order of additions inside TDPBF16PS is not pinned down).
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    out = {}
    try:
        for isa in ("avx512", "amx"):
            assert ops.set_cpu_isa(isa) == isa
            out[isa] = poisoned(m, n, dtype=out_dtype)
            ops.fp8_gemm_nt((a, sa), (b, sb), out[isa])
    finally:
        ops.set_cpu_isa("auto")
    check(out["amx"], ref_nt(a, sa, b, sb))
    assert ops.calc_diff(out["amx"], out["avx512"]) < (1e-9 if out_dtype == torch.float32 else 1e-5)
