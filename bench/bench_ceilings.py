"""The machine's ceilings, measured in the same run as everything else: the matmul rate (the
practical compute peak for MFU and GEMM comparisons) and the memory copy bandwidth (for
memory-bound kernels). Ceilings have no "ours"; other groups compare against them in the report.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.quick), torch.float32], ids=str)
def test_matmul_peak(benchmark, dtype: torch.dtype) -> None:
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    benchmark.group = "ceilings matmul 2048^3 cpu"
    benchmark.extra_info.update(role="ceiling", work=2 * n**3, unit="FLOP")
    benchmark(torch.matmul, a, b)


@pytest.mark.quick
def test_memory_copy_bandwidth(benchmark) -> None:
    src = torch.randn(64 * 2**20 // 4)  # 64 MiB, well past the caches
    dst = torch.empty_like(src)
    benchmark.group = "ceilings memory copy 64MiB cpu"
    benchmark.extra_info.update(role="ceiling", work=2 * src.numel() * 4, unit="B")  # read + write
    benchmark(dst.copy_, src)
