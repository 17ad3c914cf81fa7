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
    """The instruction set the CPU kernels use now: 'portable', 'avx2', 'avx512' or 'amx'."""
    return _C.active_cpu_isa()


def detected_cpu_isa() -> str:
    """The best instruction set this CPU supports."""
    return _C.detected_cpu_isa()


def set_cpu_isa(isa: str) -> str:
    """Caps the CPU kernels' instruction set ('portable', 'avx2', 'avx512', 'amx', 'auto'), for tests and
    benchmarks of each code path; returns the one now active."""
    return _C.set_cpu_isa(isa)
