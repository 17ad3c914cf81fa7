"""The AMX-BF16 FP8 GEMM path (csrc/gemm/gemm_amx.cpp with the blocking of gemm_amx_driver.h) on a
CPU without AMX: the kernel file is compiled without its target pragma against the AVX-512
stand-in (SIMDe, libsimde-dev) plus tests/ops/amx_emulation/immintrin.h, which emulates the tile
instructions from Intel's definitions (a per-thread register file of 8 tiles; TDPBF16PS per the
SDM's pseudo-code, denormals flushed as documented), and run by a C++ harness
(amx_emulation/harness.cpp): the bf16 decode and VNNI packing bit for bit, single tiles and whole
GEMMs (M, N, K tails, several B slabs, C accumulate, NaN bytes and scales, 1 and 3 threads) against
a float64 reference, within 1e-5 of the sum of |terms| per output and calc_diff < 1e-9. It checks
the path's logic (layouts, tile shapes, promotion, padding, per-thread tile configuration); the
real instructions run only on an AMX CPU (tests/ops/test_gemm.py with DSV3_CPU_ISA=amx, which
bench/gpu_check.sh runs on the GPU machine's host)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tests.ops.test_gemm_avx512_emulated import CXX, GEMM, build_and_run, simde_found, without_target_pragma

EMULATION = Path(__file__).resolve().parent / "amx_emulation"


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the emulation headers need x86-64 (SSE)")
@pytest.mark.skipif(not simde_found(), reason="needs SIMDe's headers (apt-get install libsimde-dev)")
def test_amx_path_matches_float64_under_emulation(tmp_path: Path, fresh_seed: int) -> None:
    emulated = without_target_pragma(GEMM / "gemm_amx.cpp", tmp_path)
    units = {
        "amx": [f"-I{EMULATION}", f"-I{GEMM}", str(emulated)],  # EMULATION's immintrin.h first
        "harness": [f"-I{GEMM}", str(EMULATION / "harness.cpp")],
    }
    build_and_run(units, tmp_path, fresh_seed)
