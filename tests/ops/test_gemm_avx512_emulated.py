"""The AVX-512 FP8 GEMM kernels (csrc/gemm/gemm_avx512.cpp) on a CPU without AVX-512: the file is
compiled without its target pragma against SIMDe (libsimde-dev: AVX-512 intrinsics in portable C,
plus the few tests/ops/avx512_emulation/immintrin.h adds) and run by a C++ harness
(avx512_emulation/harness.cpp) against the portable and AVX2 kernel sets: same bits for the decode,
the panel packing and the micro-kernel, float64-close GEMV with every K tail, NaN rows and
subnormals. It checks the kernels' logic (layouts, lanes, masks, tails); the real instructions run
only on an AVX-512 CPU (tests/ops/test_gemm.py with ops.set_cpu_isa("avx512"))."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import ops

REPO = Path(__file__).resolve().parents[2]
GEMM = REPO / "csrc" / "gemm"
EMULATION = Path(__file__).resolve().parent / "avx512_emulation"
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def simde_found() -> bool:
    dirs = ["/usr/include", "/usr/local/include", *os.environ.get("CPATH", "").split(":")]
    return any(d and (Path(d) / "simde" / "x86" / "avx512.h").is_file() for d in dirs)


def without_target_pragma(source: Path, tmp_path: Path) -> Path:
    """A copy of a kernel file without its one `#pragma GCC target` line (the line that would let
    the compiler emit the instructions this CPU may lack), to compile against an emulating
    immintrin.h."""
    lines = source.read_text().splitlines(keepends=True)
    pragmas = [line for line in lines if line.startswith("#pragma GCC target")]
    assert len(pragmas) == 1, pragmas
    copy = tmp_path / f"{source.stem}_emulated.cpp"
    copy.write_text("".join(line for line in lines if line not in pragmas))
    return copy


def build_and_run(units: dict[str, list[str]], tmp_path: Path, seed: int) -> None:
    """Compiles each unit (compiler arguments, -c implied) side by side, links them into a
    harness, runs it with `seed` and requires it to report "all passed"."""
    flags = [CXX, "-std=c++17", "-O2", "-Wno-psabi", "-pthread", "-c"]
    compiles = {
        name: subprocess.Popen([*flags, *args, "-o", str(tmp_path / f"{name}.o")], stderr=subprocess.PIPE, text=True)
        for name, args in units.items()
    }
    for name, proc in compiles.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"compiling {name}:\n{err}"
    exe = tmp_path / "harness"
    objects = [str(tmp_path / f"{name}.o") for name in units]
    subprocess.run([CXX, "-pthread", *objects, "-o", str(exe)], check=True, timeout=120)
    run = subprocess.run([str(exe), str(seed)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all passed" in run.stdout


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.skipif(not simde_found(), reason="needs SIMDe's headers (apt-get install libsimde-dev)")
@pytest.mark.skipif(ops.detected_cpu_isa() == "portable", reason="compares with the AVX2 kernels: needs AVX2")
def test_avx512_kernels_match_portable_and_avx2_under_emulation(tmp_path: Path, fresh_seed: int) -> None:
    emulated = without_target_pragma(GEMM / "gemm_avx512.cpp", tmp_path)
    units = {
        "avx512": [f"-I{EMULATION}", f"-I{GEMM}", str(emulated)],  # EMULATION's immintrin.h first
        "avx2": [str(GEMM / "gemm_avx2.cpp")],
        "portable": [str(GEMM / "gemm_portable.cpp")],
        "gemv_tile": [str(GEMM / "gemv_tile.cpp")],
        "harness": [f"-I{GEMM}", str(EMULATION / "harness.cpp")],
    }
    build_and_run(units, tmp_path, fresh_seed)
