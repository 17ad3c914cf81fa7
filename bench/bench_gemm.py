"""FP8 GEMMs (ops/gemm.py) on the CPU, next to the peers issue 3 names, measured in the same run.

Peers: torch.matmul in BF16 and in FP32 (on AVX2-only CPUs oneDNN's BF16 path can be slower than
FP32, so both are printed), torch._scaled_mm with row-wise scales, and "dequantize to BF16, then
torch.matmul". A read-bandwidth ceiling (a float32 sum over as many bytes as the FP8 weight) is measured in the
memory-bound groups, so ours can be read as a fraction of the machine's bandwidth.

Targets (issue 3): compute-bound >= 0.8x BF16 matmul and >= 4x _scaled_mm; memory-bound (M <= 16,
N = K = 7168) >= 1.5x BF16 matmul (also measured on one thread, M = 1, to show how each side scales;
every case records torch's thread count in extra_info); grouped contiguous (8 x 512 rows, N 2048, K 7168) >= 0.8x
BF16 matmul on the same FLOPs. Pre-packed weights (prepack_fp8_weight, B decoded once) are
compared with the same call on (b, sb), for the dense GEMM and the grouped ones. Shapes: the issue's compute-bound shapes up to 4096 x 7168 x 7168
take seconds per call on 2 cores; the quick case is M = N = 2048, K = 7168 and the others are in
the full run.
"""

from __future__ import annotations

import pytest
import torch

import ops
from launch.metrics import MATMUL_LAYOUTS, matmul_rate
from ops.gemm import prepack_fp8_weight
from ops.reference import dequantize_tiles_reference

ROUNDS = 3


def _operands(m: int, n: int, k: int):
    a = ops.per_token_cast_to_fp8(torch.randn(m, k))
    b = ops.per_block_cast_to_fp8(torch.randn(n, k))
    return a, b


def _peer(impl: str, a, b, m: int, n: int):
    (aq, sa), (bq, sb) = a, b
    if impl == "matmul_bf16":
        x, w = torch.randn(m, aq.shape[1], dtype=torch.bfloat16), torch.randn(n, aq.shape[1], dtype=torch.bfloat16)
        return lambda: torch.matmul(x, w.T)
    if impl == "matmul_fp32":
        x, w = torch.randn(m, aq.shape[1]), torch.randn(n, aq.shape[1])
        return lambda: torch.matmul(x, w.T)
    if impl == "scaled_mm_rowwise":
        s_a = torch.rand(m, 1) + 0.5
        s_b = torch.rand(1, n) + 0.5
        return lambda: torch._scaled_mm(aq, bq.T, scale_a=s_a, scale_b=s_b, out_dtype=torch.bfloat16)
    if impl == "dequant_then_matmul":
        return lambda: torch.matmul(
            dequantize_tiles_reference(aq, sa, 1, 128, torch.bfloat16),
            dequantize_tiles_reference(bq, sb, 128, 128, torch.bfloat16).T,
        )
    raise ValueError(impl)


def _run(benchmark, group: str, impl: str, fn, work: float, unit: str = "FLOP", rounds: int = ROUNDS) -> None:
    benchmark.group = group
    role = "ours" if impl == "ours" else ("ceiling" if impl == "read_bandwidth" else "peer")
    benchmark.extra_info.update(role=role, work=work, unit=unit, threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


PEERS = ["ours", "matmul_bf16", "matmul_fp32", "scaled_mm_rowwise", "dequant_then_matmul"]


QUICK_SHAPE = (2048, 2048, 7168)
BF16_PEERS = ("matmul_bf16", "dequant_then_matmul")


def _bf16_too_slow() -> str | None:
    """Why the BF16 peers are left out of the large shapes, or None: on CPUs without AMX oneDNN's
    BF16 GEMM runs at a small fraction of FP32 and one 2048x7168x7168 call would take minutes; the
    quick shape still measures them."""
    probe = torch.randn(1024, 1024)
    rates = {dtype: matmul_rate(MATMUL_LAYOUTS["A@B^T"], probe.to(dtype), probe.to(dtype), 0.0)
             for dtype in (torch.float32, torch.bfloat16)}
    if rates[torch.bfloat16] * 3 < rates[torch.float32]:
        return (f"BF16 x @ w.T runs at {rates[torch.bfloat16] / 1e9:.1f} GFLOP/s here against FP32's "
                f"{rates[torch.float32] / 1e9:.1f} (no AMX): measured on the {'x'.join(map(str, QUICK_SHAPE))} shape only")
    return None


@pytest.mark.parametrize(
    "shape",
    [pytest.param(QUICK_SHAPE, marks=pytest.mark.quick), (4096, 2048, 7168), (2048, 7168, 7168)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("impl", PEERS)
def test_compute_bound(benchmark, shape: tuple[int, int, int], impl: str) -> None:
    m, n, k = shape
    if impl in BF16_PEERS and shape != QUICK_SHAPE and (why := _bf16_too_slow()):
        pytest.skip(why)
    a, b = _operands(m, n, k)
    if impl == "ours":
        d = torch.empty(m, n, dtype=torch.bfloat16)
        fn = lambda: ops.fp8_gemm_nt(a, b, d)  # noqa: E731
    else:
        fn = _peer(impl, a, b, m, n)
    _run(benchmark, f"fp8_gemm_nt compute-bound {m}x{n}x{k} cpu", impl, fn, 2.0 * m * n * k, rounds=2)


MEMORY_BOUND_IMPLS = ["ours", "matmul_bf16", "matmul_fp32", "read_bandwidth"]


@pytest.mark.parametrize("m", [pytest.param(1, marks=pytest.mark.quick), 8, 16])
@pytest.mark.parametrize("impl", MEMORY_BOUND_IMPLS)
def test_memory_bound(benchmark, m: int, impl: str) -> None:
    _memory_bound(benchmark, m, impl, f"fp8_gemm_nt memory-bound M={m} N=K=7168 cpu")


@pytest.mark.parametrize("impl", ["ours", "matmul_bf16", "read_bandwidth"])
def test_memory_bound_one_thread(benchmark, impl: str) -> None:
    """M = 1 on one thread: with the two-thread group above it shows how each side scales (the
    GEMV is near compute-bound on one Zen 3 core and memory-bound on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _memory_bound(benchmark, 1, impl, "fp8_gemm_nt memory-bound M=1 N=K=7168 cpu, 1 thread")
    finally:
        torch.set_num_threads(threads)


def _memory_bound(benchmark, m: int, impl: str, group: str) -> None:
    n = k = 7168
    a, b = _operands(m, n, k)
    weight_bytes = n * k  # FP8 weight bytes: what ours must stream
    if impl == "ours":
        d = torch.empty(m, n, dtype=torch.bfloat16)
        fn = lambda: ops.fp8_gemm_nt(a, b, d)  # noqa: E731
        work, unit = weight_bytes, "B"
    elif impl == "read_bandwidth":  # the ceiling: stream as many bytes (a float32 sum, vectorized)
        words = torch.rand(weight_bytes // 4)
        fn = lambda: words.sum()  # noqa: E731
        work, unit = weight_bytes, "B"
    else:
        fn = _peer(impl, a, b, m, n)
        work, unit = weight_bytes * (2 if impl == "matmul_bf16" else 4), "B"
    _run(benchmark, group, impl, fn, work, unit, rounds=5)


@pytest.mark.quick
@pytest.mark.parametrize("impl", ["ours", "matmul_bf16", "matmul_fp32"])
def test_grouped_contiguous(benchmark, impl: str) -> None:
    g, rows, n, k = 8, 512, 2048, 7168
    if impl == "matmul_bf16" and (why := _bf16_too_slow()):  # minutes per call without AMX (timed out)
        pytest.skip(why)
    m = g * rows
    work = 2.0 * m * n * k
    if impl == "ours":
        aq, sa = ops.per_token_cast_to_fp8(torch.randn(m, k))
        bs = [ops.per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(g)]
        b = (torch.stack([x[0] for x in bs]), torch.stack([x[1] for x in bs]))
        m_indices = torch.arange(g, dtype=torch.int32).repeat_interleave(rows)
        d = torch.empty(m, n, dtype=torch.bfloat16)
        fn = lambda: ops.m_grouped_fp8_gemm_nt_contiguous((aq, sa), b, d, m_indices)  # noqa: E731
    else:
        dtype = torch.bfloat16 if impl == "matmul_bf16" else torch.float32
        xs = torch.randn(g, rows, k, dtype=dtype)
        ws = torch.randn(g, n, k, dtype=dtype)
        fn = lambda: [torch.matmul(xs[e], ws[e].T) for e in range(g)]  # noqa: E731
    _run(benchmark, f"m_grouped_contiguous {g}x{rows} N={n} K={k} cpu", impl, fn, work, rounds=2)


@pytest.mark.parametrize("m", [pytest.param(17, marks=pytest.mark.quick), 64])
@pytest.mark.parametrize("impl", ["ours", "unpacked"])
def test_prepacked_weight(benchmark, m: int, impl: str) -> None:
    """ours: fp8_gemm_nt with a PackedFP8Weight (B decoded once, by prepack_fp8_weight); peer: the
    same call with (b, sb), which decodes B into fp32 panels on every call. Few-row shapes (MoE
    experts with few tokens) are where the per-call decode is a large share of the work."""
    n = k = 7168
    a, b = _operands(m, n, k)
    w = prepack_fp8_weight(b) if impl == "ours" else b
    d = torch.empty(m, n, dtype=torch.bfloat16)
    fn = lambda: ops.fp8_gemm_nt(a, w, d)  # noqa: E731
    _run(benchmark, f"fp8_gemm_nt prepacked weight M={m} N=K=7168 cpu", impl, fn, 2.0 * m * n * k)


def _grouped_weight(g: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    bs = [ops.per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(g)]
    return torch.stack([x[0] for x in bs]), torch.stack([x[1] for x in bs])


@pytest.mark.quick
@pytest.mark.parametrize("impl", ["ours", "unpacked"])
def test_prepacked_grouped_contiguous(benchmark, impl: str) -> None:
    """ours: m_grouped_fp8_gemm_nt_contiguous with a grouped PackedFP8Weight; peer: the same call
    with (b, sb) (every group's B decoded per call), on the issue's grouped shape."""
    g, rows, n, k = 8, 512, 2048, 7168
    m = g * rows
    a = ops.per_token_cast_to_fp8(torch.randn(m, k))
    b = _grouped_weight(g, n, k)
    w = prepack_fp8_weight(b) if impl == "ours" else b
    m_indices = torch.arange(g, dtype=torch.int32).repeat_interleave(rows)
    d = torch.empty(m, n, dtype=torch.bfloat16)
    fn = lambda: ops.m_grouped_fp8_gemm_nt_contiguous(a, w, d, m_indices)  # noqa: E731
    _run(benchmark, f"m_grouped_contiguous {g}x{rows} N={n} K={k} cpu, prepacked weight", impl, fn,
         2.0 * m * n * k, rounds=2)


@pytest.mark.parametrize("rows", [pytest.param((1, 16), marks=pytest.mark.quick), (17, 64)], ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("impl", ["ours", "unpacked"])
def test_prepacked_grouped_masked(benchmark, rows: tuple[int, int], impl: str) -> None:
    """ours: m_grouped_fp8_gemm_nt_masked with a grouped PackedFP8Weight; peer: (b, sb). The
    decode-like case (1..16 valid rows per expert) runs the GEMV path, which streams the FP8 bytes
    whether or not the weight is packed: the ratio shows that packing costs nothing there. With
    17..64 rows per expert each group runs the packed path, where the per-call decode counts.
    masked_m spreads evenly over the range (the same for ours and the peer)."""
    g, n, k = 8, 2048, 7168
    lo, hi = rows
    masked_m = torch.linspace(lo, hi, g).round().to(torch.int32)
    aq, sa = ops.per_token_cast_to_fp8(torch.randn(g * hi, k))
    a = (aq.view(g, hi, k), sa.view(g, hi, -1))
    b = _grouped_weight(g, n, k)
    w = prepack_fp8_weight(b) if impl == "ours" else b
    d = torch.empty(g, hi, n, dtype=torch.bfloat16)
    expected_m = (lo + hi) // 2
    fn = lambda: ops.m_grouped_fp8_gemm_nt_masked(a, w, d, masked_m, expected_m)  # noqa: E731
    _run(benchmark, f"m_grouped_masked G={g} masked_m {lo}..{hi} N={n} K={k} cpu, prepacked weight", impl, fn,
         2.0 * int(masked_m.sum()) * n * k, rounds=5)
