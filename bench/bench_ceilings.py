"""The machine's ceilings, measured in the same run as everything else, so every other result can
be read as a fraction of what this machine can do at all:

- matmul rate (the practical compute peak for MFU and GEMM comparisons), BF16 and FP32 (the
  faster one is the ceiling), each in its fastest operand layout; 2048^3, smaller for a BF16
  without a hardware path (see _matmul_plan);
- memory copy bandwidth (for memory-bound kernels);
- loopback all_to_all bandwidth of gloo ranks on this machine, at a few sizes (for dispatch and
  combine: bytes RECEIVED per rank / time, DeepEP's convention, the rank's own chunk included as
  bench_comm counts it).

Each CPU ceiling records the 1-minute load average (``extra_info["loadavg"]``): a ceiling
measured on a busy machine is low, and the report says so. Ceilings have no "ours"; ``python -m bench.report`` matches each result to the ceiling of its
kind (``extra_info["kind"]``: "matmul", "memory", "all_to_all") on the same device, and for
all_to_all the size nearest to the result's bytes.

The all_to_all rounds are timed as bench_comm times its ranks: a barrier, one call, and the
SLOWEST rank's wall time is the round's time; those per-round times are what pytest-benchmark
records (the pool's task round-trip is not counted).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from launch.metrics import MATMUL_LAYOUTS, matmul_rates
from tests.harness.distributed import run_distributed

A2A_RANKS = 4  # as bench_comm's dispatch/combine, so its results compare to this ceiling
A2A_MIB = [pytest.param(1, id="1MiB"), pytest.param(8, id="8MiB", marks=pytest.mark.quick), pytest.param(64, id="64MiB")]
A2A_ROUNDS = 5
_cache: dict = {}


def _matmul_plan(dtype: torch.dtype) -> tuple[str, int]:
    """(fastest layout, size): FP32 at 2048^3; another dtype at the largest of 2048, 1024, 512
    whose call the 512^3 probe predicts under half a second, so a dtype without a fast path here
    (BF16 without BF16 instructions: a 2048^3 call can last a minute) keeps the run short."""
    rates = matmul_rates(dtype, 512, 0.0)  # the layouts differ 5-25x for BF16 without BF16 instructions
    best = max(rates, key=rates.get)
    if dtype == torch.float32:
        return best, 2048
    return best, next((n for n in (2048, 1024) if 2 * n**3 / rates[best] <= 0.5), 512)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.quick)], ids=str)
def test_matmul_peak(benchmark, dtype: torch.dtype) -> None:
    layout, n = _matmul_plan(dtype)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    benchmark.group = "ceilings matmul cpu"
    benchmark.extra_info.update(role="ceiling", kind="matmul", device="cpu", impl=f"{str(dtype)[6:]} {n}^3 {layout}",
                                n=n, work=2 * n**3, unit="FLOP", loadavg=os.getloadavg()[0])
    benchmark.pedantic(MATMUL_LAYOUTS[layout], args=(a, b), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.quick
def test_memory_copy_bandwidth(benchmark) -> None:
    src = torch.randn(64 * 2**20 // 4)  # 64 MiB, well past the caches
    dst = torch.empty_like(src)
    benchmark.group = "ceilings memory copy 64MiB cpu"
    benchmark.extra_info.update(role="ceiling", kind="memory", device="cpu", impl="copy 64MiB",
                                work=2 * src.numel() * 4, unit="B", loadavg=os.getloadavg()[0])
    benchmark.pedantic(dst.copy_, args=(src,), rounds=10, iterations=1, warmup_rounds=1)  # read + write


def a2a_rounds(rank: int, world: int, nbytes: int, rounds: int) -> list[float]:
    """Per-round wall time of the slowest rank for one all_to_all_single of ``nbytes`` per rank
    (equal splits), after one warm-up call. Buffers are built once per size and reused."""
    key = ("a2a", nbytes)
    if key not in _cache:
        _cache.clear()  # keep one size's buffers at a time (64 MiB x 2 per rank)
        n = nbytes // 2 // world * world  # bf16 elements, divisible by the world size
        _cache[key] = (torch.randn(n).bfloat16(), torch.empty(n, dtype=torch.bfloat16))
    src, dst = _cache[key]
    dist.all_to_all_single(dst, src)
    times = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(dst, src)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return times


def record_times(benchmark, times: list[float]) -> None:
    """Makes ``times`` (seconds measured elsewhere, one per round) this benchmark's rounds:
    pytest-benchmark reads its timer at each round's start and end; this timer answers 0, t."""
    readings = iter([x for t in times for x in (0.0, t)])
    benchmark._timer = lambda: next(readings)
    benchmark.pedantic(lambda: None, rounds=len(times), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("mib", A2A_MIB)
def test_all_to_all_loopback_bandwidth(benchmark, mib: int) -> None:
    nbytes = mib * 2**20
    times = run_distributed(a2a_rounds, A2A_RANKS, nbytes, A2A_ROUNDS, timeout=300)[0]
    benchmark.group = f"ceilings all_to_all loopback {A2A_RANKS} gloo ranks cpu"
    received = nbytes // 2 // A2A_RANKS * A2A_RANKS * 2  # every rank receives as much as it sends
    benchmark.extra_info.update(role="ceiling", kind="all_to_all", device="cpu", ranks=A2A_RANKS, impl=f"{mib}MiB",
                                work=received, unit="B", loadavg=os.getloadavg()[0])
    record_times(benchmark, times)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.quick), torch.float32], ids=str)
def test_matmul_peak_cuda(benchmark, dtype: torch.dtype) -> None:
    n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")

    def mm() -> None:
        torch.matmul(a, b)
        torch.cuda.synchronize()

    benchmark.group = "ceilings matmul 8192^3 cuda"
    benchmark.extra_info.update(role="ceiling", kind="matmul", device="cuda", impl=f"{str(dtype)[6:]} {n}^3",
                                gpu=torch.cuda.get_device_name(), work=2 * n**3, unit="FLOP")
    benchmark.pedantic(mm, rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.cuda
@pytest.mark.quick
def test_memory_copy_bandwidth_cuda(benchmark) -> None:
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB, far past L2
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.group = "ceilings memory copy 1GiB cuda"
    benchmark.extra_info.update(role="ceiling", kind="memory", device="cuda", gpu=torch.cuda.get_device_name(),
                                work=2 * src.numel() * 4, unit="B")
    benchmark.pedantic(copy, rounds=10, iterations=1, warmup_rounds=2)
