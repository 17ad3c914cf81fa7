"""Builds the native extension ``ops._C``: C++ CPU kernels always, CUDA kernels when possible.

Environment:
    DSV3_CUDA=0|1   force the CUDA sources off or on (default: on when torch has CUDA and nvcc
                    is found).
    MAX_JOBS        parallel compile jobs (ninja), as for any torch extension.

CPU code is never built with -march=native: AVX-512/AMX code sits in target-attributed
functions chosen at run time (csrc/common/cpu_features.cpp).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup


def _cuda_home() -> str | None:
    """The toolkit folder: CUDA_HOME, else /usr/local/cuda, else where nvcc really lives (a
    wrapper script on PATH would otherwise make torch look for the libraries in its parent)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


if _cuda_home():
    os.environ["CUDA_HOME"] = _cuda_home()  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent
# Hopper fast paths (wgmma, TMA) need sm_90a; sm_80 machine code plus compute_80 PTX covers
# Ampere, Ada and anything newer through the driver's JIT.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_80,code=compute_80",
]


def want_cuda() -> bool:
    forced = os.environ.get("DSV3_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        raise SystemExit(f"DSV3_CUDA must be 0 or 1, got {forced!r}")
    home = _cuda_home()
    available = torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if forced == "1" and not available:
        raise SystemExit("DSV3_CUDA=1 but torch has no CUDA or nvcc was not found")
    return available if forced == "" else forced == "1"


def cuda_include_dirs() -> list[str]:
    """CUDA headers that pip's CUDA wheels ship (torch's CUDA build needs them next to nvcc's)."""
    site = Path(sysconfig.get_paths()["purelib"])
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def openmp_flags() -> list[str]:
    """-fopenmp when torch's ATen uses OpenMP (Linux wheels): at::parallel_for is header code, so an
    extension compiled without it runs every parallel_for on ONE thread. The extension then needs
    libgomp.so.1, which resolves to the copy torch has already loaded (one OpenMP runtime)."""
    uses_openmp = "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")
    return ["-fopenmp"] if uses_openmp else []


def extension():
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    omp = openmp_flags()
    cxx = ["-O3", "-fno-fast-math", "-Wall", "-Wno-unused-function", *omp]
    if not want_cuda():
        return CppExtension("ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # the host side of .cu files gets OpenMP too: ATen's inline parallel helpers must be compiled
    # the same way in every translation unit (the linker keeps one copy)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *CUDA_ARCH_FLAGS, *(f"-Xcompiler={f}" for f in omp)]
    return CUDAExtension(
        "ops._C",
        sources,
        include_dirs=cuda_include_dirs(),
        define_macros=[("DSV3_WITH_CUDA", "1")],
        extra_compile_args={"cxx": [*cxx, "-DDSV3_WITH_CUDA"], "nvcc": [*nvcc, "-DDSV3_WITH_CUDA"]},
        extra_link_args=omp,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
