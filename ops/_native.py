"""Loads the native extension ``ops._C`` and says what it was built with.

Importing it registers every kernel with torch.library under the ``dsv3`` namespace, so
``torch.ops.dsv3.<name>`` dispatches to the CPU or CUDA kernel by the tensors' device.
"""

from __future__ import annotations

import torch

try:
    from ops import _C
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "ops._C is not built. Run `pip install --no-build-isolation -e .` (or "
        "`python setup.py build_ext --inplace`) in the repository root."
    ) from err

native = torch.ops.dsv3


def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled into ops._C."""
    return bool(_C.with_cuda)


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: 'portable', 'avx2', 'avx512' or 'amx'.

    By default it is the best one that this CPU supports AND whose kernels have been verified on
    a real CPU: 'avx2' at most for now, even on an AVX-512 or AMX CPU, because the AVX-512 kernels
    have not yet run on one. ``set_cpu_isa("avx512")`` or ``DSV3_CPU_ISA=avx512`` opts in.
    """
    return _C.active_cpu_isa()


def detected_cpu_isa() -> str:
    """The best instruction set this CPU supports (cpuid and OS state), whether or not it is used."""
    return _C.detected_cpu_isa()


def set_cpu_isa(isa: str) -> str:
    """Caps the CPU kernels' instruction set and returns the one now active (the cap, or less where
    the CPU lacks it); for tests and benchmarks of each code path.

    isa: 'portable', 'avx2', 'avx512' or 'amx' (by name, also above the verified level: see
    ``cpu_isa``), or 'auto': back to the default cap, which is the value of the environment
    variable ``DSV3_CPU_ISA`` when the process started with one, else the highest verified
    instruction set ('avx2'). Raises ValueError for other names.
    """
    return _C.set_cpu_isa(isa)
