"""FP8 GEMM ops on CUDA (csrc/gemm/fp8_gemm_cuda.cu): every entry point against a float64
reference computed from the same FP8 operands (dequantize, matmul in float64), and against the
CPU kernel of the same op. All tests need a GPU and skip elsewhere.

The native ops are called directly (schemas in csrc/gemm/gemm_ops.cpp): these tests pin down the
CUDA kernels; the Python faces (ops/gemm.py) and their argument checks are tested with the CPU.
The tests run on the tensor-core path the environment selects (DSV3_FP8_GEMM_KERNEL, default
mma_sync). On a Hopper GPU, one test reruns this whole module in a child process for each Hopper
kernel (DSV3_FP8_GEMM_KERNEL=wgmma, then tma): a fault of a not-yet-verified kernel then cannot
leave this process's CUDA context broken for the tests that follow. The TMA kernel takes only
operands with 16-byte-aligned rows (K % 16 == 0 here); the others fall back to wgmma, and the
shapes below include both kinds.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops
from ops._native import _C, native
from ops.reference import dequantize_tiles_reference
from tests.harness.tensors import assert_no_poison, poisoned

pytestmark = pytest.mark.cuda

M_LIST = [1, 7, 64, 128, 1000, 4096]
N_LIST = [1, 64, 112, 2112, 7168]
K_LIST = [128, 576, 7168, 100]
TOL = 1e-3  # ARCHITECTURE.md: FP8 GEMM against float64
CPU_TOL = 1e-6  # both kernels promote in FP32 per 128-K block; only summation order differs
CPU_MAX_WORK = 1 << 28  # M*N*K above which the CPU comparison is skipped (time on the GPU machine)


KERNEL = os.environ.get("DSV3_FP8_GEMM_KERNEL", "mma_sync")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kernel", ["wgmma", "tma"])
def test_hopper_kernel_passes_this_module_in_a_child_process(kernel: str) -> None:
    if KERNEL != "mma_sync":
        pytest.skip("already a child run")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"{kernel} needs a Hopper GPU (compute capability 9.x)")
    env = {**os.environ, "DSV3_FP8_GEMM_KERNEL": kernel}
    # the largest dense shapes are left out to stay within the GPU check's time per test
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "not 4096 and not 7168"]
    try:
        child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{kernel} run did not finish in 110 s:\n{str(err.stdout)[-2000:]}")
    assert child.returncode == 0, f"{kernel} run failed:\n{(child.stdout + child.stderr)[-4000:]}"


def launches() -> dict[str, int]:
    return _C.fp8_gemm_cuda_launches()


@pytest.mark.parametrize("k", [256, 100])
def test_the_selected_kernel_runs(k: int) -> None:
    """Each call launches the kernel DSV3_FP8_GEMM_KERNEL names (mma_sync off Hopper); tma falls
    back to wgmma when the TMA cannot read the operands (rows of 100 bytes are not 16-byte
    aligned)."""
    expect = KERNEL if torch.cuda.get_device_capability()[0] == 9 else "mma_sync"
    if expect == "tma" and k % 16:
        expect = "wgmma"
    a, sa = ops.per_token_cast_to_fp8(randn(130, k))
    b, sb = ops.per_block_cast_to_fp8(randn(200, k))
    d = torch.empty(130, 200, device="cuda")
    before = launches()
    native.fp8_gemm_nt_out(a, sa, b, sb, None, d)
    after = launches()
    assert {name: after[name] - before[name] for name in after} == {
        name: int(name == expect) for name in after
    }


def same_on_wgmma_and_tma(monkeypatch: pytest.MonkeyPatch, call, d: torch.Tensor) -> None:
    """call(d) fills d; the TMA kernel must give exactly what the wgmma kernel gives (the same
    wgmma sequence on the same bytes, zero-filled alike past every edge; the same promotion),
    bit for bit, including the poison left where neither may write (rows past masked_m)."""
    outs = []
    for kernel in ("wgmma", "tma"):
        monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", kernel)
        out = d.clone()
        before = launches()[kernel]
        call(out)
        assert launches()[kernel] > before, f"the {kernel} kernel did not run"
        outs.append(out)
    bits = [out.view(torch.int16 if out.element_size() == 2 else torch.int32) for out in outs]  # NaN poison too
    assert torch.equal(bits[0], bits[1]), f"tma differs from wgmma: calc_diff {ops.calc_diff(outs[0], outs[1]):.3g}"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tma_kernel_equals_wgmma_bit_for_bit(monkeypatch: pytest.MonkeyPatch, out_dtype: torch.dtype) -> None:
    """Run in the tma child only (a fault of the TMA kernel must not reach the main process)."""
    if KERNEL != "tma":
        pytest.skip("runs in the DSV3_FP8_GEMM_KERNEL=tma child")
    m, n, k = random.randint(1, 700), random.randint(1, 600), 16 * random.randint(1, 80)
    a, sa = ops.per_token_cast_to_fp8(randn(m, k))
    b, sb = ops.per_block_cast_to_fp8(randn(n, k))
    d = poisoned(m, n, dtype=out_dtype, device="cuda")
    same_on_wgmma_and_tma(monkeypatch, lambda out: native.fp8_gemm_nt_out(a, sa, b, sb, None, out), d)

    sizes = [random.randint(0, 300) for _ in range(3)] + [random.randint(1, 300)]
    m_indices = contiguous_layout(sizes, 1).cuda()
    m_indices[random.randrange(m_indices.numel())] = -1  # a padding row inside a segment
    a, sa = ops.per_token_cast_to_fp8(randn(m_indices.numel(), k))
    bq = [ops.per_block_cast_to_fp8(randn(n, k)) for _ in sizes]
    bg, sbg = torch.stack([q for q, _ in bq]), torch.stack([s for _, s in bq])
    d = poisoned(m_indices.numel(), n, dtype=out_dtype, device="cuda")
    same_on_wgmma_and_tma(monkeypatch, lambda out: native.m_grouped_fp8_gemm_nt_contiguous_out(a, sa, bg, sbg, m_indices, out), d)

    max_m = random.randint(1, 300)
    masked = torch.randint(0, max_m + 1, (len(sizes),), dtype=torch.int32, device="cuda")
    a, sa = ops.per_token_cast_to_fp8(randn(len(sizes), max_m, k))
    d = poisoned(len(sizes), max_m, n, dtype=out_dtype, device="cuda")
    same_on_wgmma_and_tma(monkeypatch, lambda out: native.m_grouped_fp8_gemm_nt_masked_out(a, sa, bg, sbg, masked, max_m, out), d)

    ks = [0, 16 * random.randint(1, 40), 16 * random.randint(1, 40)]  # weight gradients: B per row
    random.shuffle(ks)
    a, sa, b, sb = k_grouped_operands(m, n, ks)
    d = poisoned(len(ks), m, n, dtype=out_dtype, device="cuda")
    same_on_wgmma_and_tma(monkeypatch, lambda out: native.k_grouped_fp8_gemm_nt_contiguous_out(a, sa, b, sb, ks, None, out), d)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda")


def deq(q: torch.Tensor, s: torch.Tensor, rows: int) -> torch.Tensor:
    """Payload times its scale, float64 (1 x 128 tiles when rows == 1, 128 x 128 blocks when 128)."""
    return dequantize_tiles_reference(q, s, rows, 128)


def reference_nt(a, sa, b, sb, sb_rows: int, c: torch.Tensor | None = None) -> torch.Tensor:
    ref = deq(a, sa, 1) @ deq(b, sb, sb_rows).T
    return ref if c is None else ref + c.double()


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows] for any dtype (FP8 gathered through its bytes)."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)[rows].view(t.dtype)
    return t[rows]


def cpu_twin(op, *args) -> list:
    """Runs the same native op on CPU copies of the arguments; returns the CPU arguments."""
    cpu_args = [x.cpu() if isinstance(x, torch.Tensor) else x for x in args]
    op(*cpu_args)
    return cpu_args


@pytest.mark.parametrize("n", N_LIST)
@pytest.mark.parametrize("m", M_LIST)
def test_fp8_gemm_nt_matches_float64_and_cpu(m: int, n: int) -> None:
    for k in K_LIST:
        a, sa = ops.per_token_cast_to_fp8(randn(m, k))
        b, sb = ops.per_block_cast_to_fp8(randn(n, k))
        d = poisoned(m, n, dtype=torch.bfloat16, device="cuda")
        native.fp8_gemm_nt_out(a, sa, b, sb, None, d)
        assert_no_poison(d)
        ref = reference_nt(a, sa, b, sb, 128)
        diff = ops.calc_diff(d, ref)
        assert diff < TOL, f"M={m} N={n} K={k}: calc_diff {diff:.3g}"
        if m * n * k <= CPU_MAX_WORK:
            d_cpu = poisoned(m, n, dtype=torch.bfloat16)
            cpu_twin(native.fp8_gemm_nt_out, a, sa, b, sb, None, d_cpu)
            assert ops.calc_diff(d.cpu(), d_cpu) < CPU_TOL, f"M={m} N={n} K={k}: CUDA and CPU kernels differ"


@pytest.mark.parametrize("m,n,k", [(1, 1, 100), (7, 112, 576), (129, 257, 300), (1000, 2112, 7168)])
def test_fp8_gemm_nt_fp32_output_with_c_accumulates(m: int, n: int, k: int) -> None:
    a, sa = ops.per_token_cast_to_fp8(randn(m, k))
    b, sb = ops.per_block_cast_to_fp8(randn(n, k))
    c = randn(m, n) * 10
    d = poisoned(m, n, dtype=torch.float32, device="cuda")
    native.fp8_gemm_nt_out(a, sa, b, sb, c, d)
    assert_no_poison(d)
    assert ops.calc_diff(d, reference_nt(a, sa, b, sb, 128, c)) < TOL
    # c may be d itself (in-place accumulation)
    d2 = c.clone()
    native.fp8_gemm_nt_out(a, sa, b, sb, d2, d2)
    assert ops.calc_diff(d2, d) < 1e-12
    d_cpu = poisoned(m, n, dtype=torch.float32)
    cpu_twin(native.fp8_gemm_nt_out, a, sa, b, sb, c, d_cpu)
    assert ops.calc_diff(d.cpu(), d_cpu) < CPU_TOL


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (300, 100, 130), (5, 1, 7168)])
def test_fp8_gemm_nt_per_row_b_scales_and_strided_scales(m: int, n: int, k: int) -> None:
    """B with 1x128 per-row scales (the weight-gradient layout); sa and sb given column-major."""
    a, sa = ops.per_token_cast_to_fp8(randn(m, k))
    b, sb = ops.per_token_cast_to_fp8(randn(n, k))
    sa_t, sb_t = sa.t().contiguous().t(), sb.t().contiguous().t()  # same values, column-major
    d = poisoned(m, n, dtype=torch.float32, device="cuda")
    native.fp8_gemm_nt_out(a, sa_t, b, sb_t, None, d)
    assert_no_poison(d)
    assert ops.calc_diff(d, reference_nt(a, sa, b, sb, 1)) < TOL


def test_fp8_gemm_nt_nan_scale_poisons_only_its_row() -> None:
    m, n, k = 200, 300, 384
    a, sa = ops.per_token_cast_to_fp8(randn(m, k))
    b, sb = ops.per_block_cast_to_fp8(randn(n, k))
    row = random.randrange(m)
    sa[row, 1] = float("nan")
    d = poisoned(m, n, dtype=torch.float32, device="cuda")
    native.fp8_gemm_nt_out(a, sa, b, sb, None, d)
    nan_rows = torch.isnan(d).any(dim=1).nonzero().flatten().tolist()
    assert nan_rows == [row] and torch.isnan(d[row]).all()


def contiguous_layout(sizes: list[int], alignment: int) -> torch.Tensor:
    """m_indices for groups of the given sizes, each segment padded with -1 rows to `alignment`."""
    idx = []
    for g, size in enumerate(sizes):
        idx += [g] * size + [-1] * ((-size) % alignment)
    return torch.tensor(idx, dtype=torch.int32)


@pytest.mark.parametrize("alignment", [1, 128])
@pytest.mark.parametrize("n,k", [(64, 128), (112, 100), (2112, 7168), (4096, 576)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_m_grouped_contiguous_matches_float64_and_cpu(alignment: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    sizes = [random.randint(1, 300) for _ in range(5)]
    sizes[random.randrange(5)] = 0  # an empty group
    groups = len(sizes)
    m_indices = contiguous_layout(sizes, alignment)
    m = m_indices.numel()
    a, sa = ops.per_token_cast_to_fp8(randn(m, k))
    bq = [ops.per_block_cast_to_fp8(randn(n, k)) for _ in range(groups)]
    b, sb = torch.stack([q for q, _ in bq]), torch.stack([s for _, s in bq])
    d = poisoned(m, n, dtype=out_dtype, device="cuda")
    native.m_grouped_fp8_gemm_nt_contiguous_out(a, sa, b, sb, m_indices.cuda(), d)
    assert_no_poison(d)
    ref = torch.zeros(m, n, dtype=torch.float64, device="cuda")
    for g in range(groups):
        rows = (m_indices == g).nonzero().flatten().cuda()
        if rows.numel():
            ref[rows] = reference_nt(take_rows(a, rows), sa[rows], b[g], sb[g], 128)
    padding = (m_indices == -1).cuda()
    assert (d[padding] == 0).all(), "padding rows (-1) must be written as zeros"
    assert ops.calc_diff(d, ref) < TOL
    if m * n * k <= CPU_MAX_WORK:
        d_cpu = poisoned(m, n, dtype=out_dtype)
        cpu_twin(native.m_grouped_fp8_gemm_nt_contiguous_out, a, sa, b, sb, m_indices, d_cpu)
        assert ops.calc_diff(d.cpu(), d_cpu) < CPU_TOL


@pytest.mark.parametrize("k", [300, 320])
def test_m_grouped_contiguous_unsorted_rows(k: int) -> None:
    """Rows of different experts interleaved inside one 128-row tile (alignment 1, unsorted)."""
    groups, m, n = 4, 333, 200
    m_indices = torch.randint(-1, groups, (m,), dtype=torch.int32)
    a, sa = ops.per_token_cast_to_fp8(randn(m, k))
    bq = [ops.per_block_cast_to_fp8(randn(n, k)) for _ in range(groups)]
    b, sb = torch.stack([q for q, _ in bq]), torch.stack([s for _, s in bq])
    d = poisoned(m, n, dtype=torch.float32, device="cuda")
    native.m_grouped_fp8_gemm_nt_contiguous_out(a, sa, b, sb, m_indices.cuda(), d)
    assert_no_poison(d)
    ref = torch.zeros(m, n, dtype=torch.float64, device="cuda")
    for g in range(groups):
        rows = (m_indices == g).nonzero().flatten().cuda()
        if rows.numel():
            ref[rows] = reference_nt(take_rows(a, rows), sa[rows], b[g], sb[g], 128)
    assert ops.calc_diff(d, ref) < TOL
    assert (d[(m_indices == -1).cuda()] == 0).all()


@pytest.mark.parametrize("max_m,n,k", [(1, 64, 128), (64, 112, 100), (200, 2112, 7168), (256, 4096, 576)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_m_grouped_masked_matches_float64_and_leaves_masked_rows(max_m: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    groups = 4
    masked = [random.randint(0, max_m) for _ in range(groups)]
    masked[0], masked[-1] = 0, max_m  # an empty group and a full one
    a, sa = ops.per_token_cast_to_fp8(randn(groups, max_m, k))
    bq = [ops.per_block_cast_to_fp8(randn(n, k)) for _ in range(groups)]
    b, sb = torch.stack([q for q, _ in bq]), torch.stack([s for _, s in bq])
    d = poisoned(groups, max_m, n, dtype=out_dtype, device="cuda")
    for g, mm in enumerate(masked):  # rows past masked_m hold values the kernel must not touch
        d[g, mm:] = randn(max_m - mm, n).to(out_dtype)
    before = d.clone()
    native.m_grouped_fp8_gemm_nt_masked_out(a, sa, b, sb, torch.tensor(masked, dtype=torch.int32, device="cuda"), max_m, d)
    for g, mm in enumerate(masked):
        assert torch.equal(d[g, mm:], before[g, mm:]), f"group {g}: rows past masked_m={mm} were written"
        valid = d[g, :mm]
        assert_no_poison(valid)
        assert ops.calc_diff(valid, reference_nt(a[g, :mm], sa[g, :mm], b[g], sb[g], 128)) < TOL
    if groups * max_m * n * k <= CPU_MAX_WORK:
        d_cpu = before.cpu()
        cpu_twin(native.m_grouped_fp8_gemm_nt_masked_out, a, sa, b, sb, torch.tensor(masked, dtype=torch.int32), max_m, d_cpu)
        for g, mm in enumerate(masked):
            assert ops.calc_diff(d[g, :mm].cpu(), d_cpu[g, :mm]) < CPU_TOL


def k_grouped_operands(m: int, n: int, ks: list[int]):
    """dY [sumK, M] and X [sumK, N] quantized per group along the tokens: (a, sa, b, sb)."""
    a_parts, sa_parts, b_parts, sb_parts = [], [], [], []
    for kg in ks:
        qa, s_a = ops.transposed_per_token_cast_to_fp8(randn(kg, m))  # [M, kg], [M, ceil(kg/128)]
        qb, s_b = ops.transposed_per_token_cast_to_fp8(randn(kg, n))
        a_parts.append(qa)
        sa_parts.append(s_a)
        b_parts.append(qb)
        sb_parts.append(s_b)
    return torch.cat(a_parts, 1), torch.cat(sa_parts, 1), torch.cat(b_parts, 1), torch.cat(sb_parts, 1)


@pytest.mark.parametrize("m,n", [(7, 112), (256, 2112), (2112, 64)])
@pytest.mark.parametrize(
    "out_dtype,with_c", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)], ids=["bf16", "f32", "f32+c"]
)
@pytest.mark.parametrize("ks_kind", ["any", "aligned16"])
def test_k_grouped_matches_float64_and_cpu(m: int, n: int, out_dtype: torch.dtype, with_c: bool, ks_kind: str) -> None:
    """"aligned16": every group starts 16-byte aligned (the TMA kernel's case); "any": some do not."""
    if ks_kind == "any":
        ks = [0, 128, random.randint(1, 700), 1000, random.choice([16, 100, 4096])]
    else:
        ks = [0, 128, 16 * random.randint(1, 44), 1024, random.choice([16, 112, 4096])]
    random.shuffle(ks)
    a, sa, b, sb = k_grouped_operands(m, n, ks)
    groups = len(ks)
    c = randn(groups, m, n) if with_c else None
    d = poisoned(groups, m, n, dtype=out_dtype, device="cuda")
    native.k_grouped_fp8_gemm_nt_contiguous_out(a, sa, b, sb, ks, c, d)
    assert_no_poison(d)
    k0 = s0 = 0
    for g, kg in enumerate(ks):
        tiles = -(-kg // 128)
        ref = deq(a[:, k0 : k0 + kg], sa[:, s0 : s0 + tiles], 1) @ deq(b[:, k0 : k0 + kg], sb[:, s0 : s0 + tiles], 1).T
        if c is not None:
            ref = ref + c[g].double()
        if kg == 0 and c is None:
            assert (d[g] == 0).all(), "an empty group without c gives zeros"
        else:
            assert ops.calc_diff(d[g], ref) < TOL, f"group {g} (k={kg})"
        k0, s0 = k0 + kg, s0 + tiles
    if m * n * sum(ks) <= CPU_MAX_WORK:
        d_cpu = poisoned(groups, m, n, dtype=out_dtype)
        cpu_twin(native.k_grouped_fp8_gemm_nt_contiguous_out, a, sa, b, sb, ks, c, d_cpu)
        assert ops.calc_diff(d.cpu(), d_cpu) < CPU_TOL


def test_empty_shapes_write_nothing_and_do_not_fail() -> None:
    a, sa = ops.per_token_cast_to_fp8(randn(0, 256))
    b, sb = ops.per_block_cast_to_fp8(randn(64, 256))
    d = torch.empty(0, 64, dtype=torch.bfloat16, device="cuda")
    native.fp8_gemm_nt_out(a, sa, b, sb, None, d)
    torch.cuda.synchronize()


def run_linear(fn, device: str, x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, *extra) -> list[torch.Tensor]:
    """y, dX and dW of fn(x, w, *extra) on `device` (leaf copies of the inputs there)."""
    xd = x.detach().to(device).requires_grad_(True)
    wd = w.detach().to(device).requires_grad_(True)
    y = fn(xd, wd, *extra)
    y.backward(gy.to(device))
    return [t.detach().cpu() for t in (y, xd.grad, wd.grad)]


def test_fp8_linear_on_cuda_matches_cpu() -> None:
    """The public autograd path end to end (ops.fp8_linear: Fprop, Dgrad, Wgrad on the CUDA GEMMs)."""
    x, w, gy = torch.randn(300, 576), torch.randn(200, 576), torch.randn(300, 200)
    cuda_out = run_linear(ops.fp8_linear, "cuda", x, w, gy)
    cpu_out = run_linear(ops.fp8_linear, "cpu", x, w, gy)
    for name, got, want in zip(("y", "dX", "dW"), cuda_out, cpu_out, strict=True):
        assert ops.calc_diff(got, want) < CPU_TOL, f"{name}: CUDA and CPU differ"


def test_grouped_fp8_linear_on_cuda_matches_cpu() -> None:
    """MoE experts through the public API: m-grouped contiguous (Fprop, Dgrad), k-grouped (Wgrad)."""
    sizes = [130, 0, 77, 300]
    x, w, gy = torch.randn(sum(sizes), 384), torch.randn(len(sizes), 256, 384), torch.randn(sum(sizes), 256)
    cuda_out = run_linear(ops.grouped_fp8_linear, "cuda", x, w, gy, sizes)
    cpu_out = run_linear(ops.grouped_fp8_linear, "cpu", x, w, gy, sizes)
    for name, got, want in zip(("y", "dX", "dW"), cuda_out, cpu_out, strict=True):
        assert ops.calc_diff(got, want) < CPU_TOL, f"{name}: CUDA and CPU differ"
