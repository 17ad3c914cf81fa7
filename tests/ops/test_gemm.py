"""FP8 GEMMs (ops/gemm.py) against float64 references: dequantize both operands exactly, then
matmul in float64. Inputs have magnitudes that vary per scale tile, so a scale applied to the
wrong block, row or group shows up as a large difference."""

from __future__ import annotations

import pytest
import torch

import ops
from ops.reference import dequantize_tiles_reference
from tests.harness.tensors import assert_no_poison, poisoned

BLOCK = 128
TOL = 1e-3  # issue 3 / ARCHITECTURE.md
TOL_F32 = 1e-6  # fp32 outputs: only fp32 rounding separates us from the exact product


def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def tiled(m: int, k: int, rows: int = 1) -> torch.Tensor:
    """Normal values times a random magnitude per (rows x 128) tile (spread over ~e^+-6)."""
    mags = torch.exp(2 * torch.randn(cdiv(m, rows), cdiv(k, BLOCK)))
    return torch.randn(m, k) * mags.repeat_interleave(rows, 0).repeat_interleave(BLOCK, 1)[:m, :k]


def lhs(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.per_token_cast_to_fp8(tiled(m, k))


def rhs(n: int, k: int, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if per_row:
        return ops.per_token_cast_to_fp8(tiled(n, k))
    return ops.per_block_cast_to_fp8(tiled(n, k, BLOCK))


def deq(q: torch.Tensor, s: torch.Tensor, n_rows_per_scale: int) -> torch.Tensor:
    return dequantize_tiles_reference(q, s, n_rows_per_scale, BLOCK)


def ref_nt(a, sa, b, sb) -> torch.Tensor:
    """float64 A @ B^T of the dequantized operands (B's scale layout told apart by its rows)."""
    b_rows = 1 if sb.shape[0] == b.shape[0] else BLOCK
    return deq(a, sa, 1) @ deq(b, sb, b_rows).T


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert_no_poison(out)
    diff = ops.calc_diff(out, ref)
    assert diff < (TOL_F32 if out.dtype == torch.float32 else TOL), diff


# Every M, N and K of issue 3 appears; the large products are marked slow.
SHAPES = [
    (1, 7168, 576),
    (7, 112, 100),
    (64, 2112, 128),
    (128, 64, 7168),
    (1000, 1, 576),
    (7, 1, 100),
    (1000, 112, 128),
    (4096, 64, 100),
    (1, 2112, 7168),
    pytest.param(64, 7168, 7168, marks=pytest.mark.slow),
    pytest.param(1000, 2112, 576, marks=pytest.mark.slow),
    pytest.param(4096, 2112, 7168, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp8_gemm_nt_matches_float64_reference(m: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    d = poisoned(m, n, dtype=out_dtype)
    assert ops.fp8_gemm_nt((a, sa), (b, sb), d) is d
    check(d, ref_nt(a, sa, b, sb))


# The CPU kernel has two paths: GEMV for M <= 16 (rows of A in chunks of up to 4, rows of B in
# groups of 3, K in steps of 32 inside 128-wide blocks) and packed tiles above (6 x 16 micro-tiles,
# 96 x 128 output tiles, K chunks of 256, 512-column B slabs, tasks of one 96-row A tile against
# 1 to 4 column tiles of a slab). The shapes hit every remainder of those: e.g. 101 x 530 crosses
# a slab, 420 x 1408 gives tasks of 2 column tiles (with 2 threads) and a 3-tile last slab.
ISA_SHAPES = [
    (7, 112, 100),
    (130, 300, 700),
    (1, 129, 257),
    (2, 5, 17),
    (3, 9, 16),
    (4, 7, 143),
    (16, 37, 300),
    (17, 40, 129),
    (101, 530, 385),
    (23, 17, 1),
    (5, 4, 161),
    (6, 3, 32),
    (11, 8, 391),
    (420, 1408, 300),
]


@pytest.mark.parametrize("per_row", [False, True], ids=["block_scales", "row_scales"])
@pytest.mark.parametrize("m,n,k", ISA_SHAPES)
def test_every_cpu_isa_path_matches_reference(cpu_isas: list[str], m: int, n: int, k: int, per_row: bool) -> None:
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k, per_row=per_row)
    ref = ref_nt(a, sa, b, sb)
    try:
        for isa in cpu_isas:
            assert ops.set_cpu_isa(isa) == isa
            d = poisoned(m, n)
            ops.fp8_gemm_nt((a, sa), (b, sb), d)
            check(d, ref)
    finally:
        ops.set_cpu_isa("auto")


@pytest.mark.parametrize("m,n,k", [(7, 64, 576), (200, 130, 300)])
def test_rhs_with_per_row_scales_matches_reference(m: int, n: int, k: int) -> None:
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k, per_row=True)
    assert sb.shape == (n, cdiv(k, BLOCK))
    d = poisoned(m, n)
    ops.fp8_gemm_nt((a, sa), (b, sb), d)
    check(d, ref_nt(a, sa, b, sb))


def test_c_is_accumulated_and_may_alias_d() -> None:
    m, n, k = 65, 130, 576
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    c = torch.randn(m, n) * 100
    ref = c.double() + ref_nt(a, sa, b, sb)
    d = poisoned(m, n)
    ops.fp8_gemm_nt((a, sa), (b, sb), d, c=c)
    check(d, ref)
    ops.fp8_gemm_nt((a, sa), (b, sb), c, c=c)  # in place, as DeepGEMM's accumulating wgrad does
    check(c, ref)


def test_scales_with_any_strides_are_accepted() -> None:
    m, n, k = 33, 200, 300
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    sa_t = sa.t().contiguous().t()  # column-major view of the same values
    sb_t = sb.t().contiguous().t()
    assert not sa_t.is_contiguous() and not sb_t.is_contiguous()
    d = poisoned(m, n)
    ops.fp8_gemm_nt((a, sa_t), (b, sb_t), d)
    check(d, ref_nt(a, sa, b, sb))


def test_k_zero_gives_c_or_zeros_and_empty_m_is_fine() -> None:
    a, sa = torch.empty(5, 0, dtype=torch.float8_e4m3fn), torch.empty(5, 0)
    b, sb = torch.empty(3, 0, dtype=torch.float8_e4m3fn), torch.empty(1, 0)
    d = poisoned(5, 3)
    ops.fp8_gemm_nt((a, sa), (b, sb), d)
    assert torch.equal(d, torch.zeros(5, 3))
    (a, sa), (b, sb) = lhs(0, 256), rhs(4, 256)
    assert ops.fp8_gemm_nt((a, sa), (b, sb), torch.empty(0, 4)).shape == (0, 4)


def test_nan_scale_propagates_to_its_rows_only() -> None:
    (a, sa), (b, sb) = lhs(6, 256), rhs(10, 256)
    sa[2, 1] = float("nan")
    d = torch.empty(6, 10)
    ops.fp8_gemm_nt((a, sa), (b, sb), d)
    assert torch.isnan(d[2]).all() and not torch.isnan(d[[0, 1, 3, 4, 5]]).any()


@pytest.mark.parametrize("m", [3, 40], ids=["gemv", "packed"])
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_payload_byte_gives_nan(cpu_isas: list[str], m: int, code: int) -> None:
    (a, sa), (b, sb) = lhs(m, 200), rhs(5, 200)
    b.view(torch.uint8)[4, 150] = code  # in the K tail (200 = 128 + 64 + 8)
    b.view(torch.uint8)[2, 199] = code  # the last byte of a row
    a.view(torch.uint8)[1, 3] = code
    try:
        for isa in cpu_isas:
            ops.set_cpu_isa(isa)
            d = torch.empty(m, 5)
            ops.fp8_gemm_nt((a, sa), (b, sb), d)
            nan_cols, nan_rows = [2, 4], [1]
            assert torch.isnan(d[:, nan_cols]).all() and torch.isnan(d[nan_rows]).all(), isa
            keep = torch.ones(m, 5, dtype=torch.bool)
            keep[:, nan_cols] = False
            keep[nan_rows] = False
            assert not torch.isnan(d[keep]).any(), isa
    finally:
        ops.set_cpu_isa("auto")


def test_every_e4m3_value_is_decoded_exactly(cpu_isas: list[str]) -> None:
    # All 254 finite codes (subnormals included) on the diagonal-like product with unit scales:
    # d[m, n] = a[m] * b[n] exactly (one nonzero term per output), on both paths.
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).double()
    for m in (len(codes) // 16, len(codes)):  # 15 rows: GEMV; 254 rows: packed
        a = torch.zeros(m, 128, dtype=torch.uint8)
        a[:, 5] = 0x38  # 1.0
        b = torch.zeros(len(codes), 128, dtype=torch.uint8)
        b[:, 5] = codes
        sa, sb = torch.ones(m, 1), torch.ones(cdiv(len(codes), BLOCK), 1)
        try:
            for isa in cpu_isas:
                ops.set_cpu_isa(isa)
                d = poisoned(m, len(codes))
                ops.fp8_gemm_nt((a.view(torch.float8_e4m3fn), sa), (b.view(torch.float8_e4m3fn), sb), d)
                assert torch.equal(d.double(), values.expand(m, -1)), isa
        finally:
            ops.set_cpu_isa("auto")


def test_e4m3_subnormals_survive_flush_denormal(cpu_isas: list[str]) -> None:
    # The AVX2 GEMV decodes e4m3 subnormals into fp32 subnormals: with torch.set_flush_denormal
    # (MXCSR DAZ/FTZ) on, the kernel must still read them exactly (it clears DAZ while it runs).
    codes = torch.tensor([c for c in range(1, 8)] + [0x80 | c for c in range(1, 8)], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).double()  # +-2^-9 .. +-7 * 2^-9
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for m in (3, 40):  # GEMV and packed paths
            a = torch.zeros(m, 128, dtype=torch.uint8)
            a[:, 7] = 0x38  # 1.0
            b = torch.zeros(len(codes), 128, dtype=torch.uint8)
            b[:, 7] = codes
            sa, sb = torch.ones(m, 1), torch.ones(1, 1)
            for isa in cpu_isas:
                ops.set_cpu_isa(isa)
                d = poisoned(m, len(codes))
                ops.fp8_gemm_nt((a.view(torch.float8_e4m3fn), sa), (b.view(torch.float8_e4m3fn), sb), d)
                assert torch.equal(d.double(), values.expand(m, -1)), (isa, m)
    finally:
        torch.set_flush_denormal(False)
        ops.set_cpu_isa("auto")


def test_nn_tn_tt_variants_match_nt() -> None:
    m, n, k = 20, 140, 300
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    ref = ref_nt(a, sa, b, sb)
    at, bt = a.t().contiguous(), b.t().contiguous()  # [K, M], [K, N]
    for fn, x, y in [(ops.fp8_gemm_nn, a, bt), (ops.fp8_gemm_tn, at, b), (ops.fp8_gemm_tt, at, bt)]:
        d = poisoned(m, n)
        fn((x, sa), (y, sb), d)
        check(d, ref)


# ---- grouped GEMMs ----


def grouped_rhs(g: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [rhs(n, k) for _ in range(g)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes,n,k", [([0, 5, 130, 0, 17], 112, 576), ([64, 1, 200], 130, 100), ([300, 0], 64, 7168)])
def test_m_grouped_contiguous_matches_reference(sizes: list[int], n: int, k: int, out_dtype: torch.dtype) -> None:
    g = len(sizes)
    parts = [torch.full((s,), e, dtype=torch.int32) for e, s in enumerate(sizes)]
    parts.insert(1, torch.full((7,), -1, dtype=torch.int32))  # padding rows between groups
    parts.append(torch.full((3,), -1, dtype=torch.int32))
    m_indices = torch.cat(parts)
    m = m_indices.numel()
    (a, sa), (b, sb) = lhs(m, k), grouped_rhs(g, n, k)
    d = poisoned(m, n, dtype=out_dtype)
    ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, m_indices)
    ref = torch.zeros(m, n, dtype=torch.float64)
    for e in range(g):
        rows = m_indices == e
        ref[rows] = ref_nt(a[rows], sa[rows], b[e], sb[e])
    check(d, ref)
    assert (d[m_indices == -1] == 0).all()


def test_m_grouped_contiguous_with_unsorted_indices() -> None:
    g, m, n, k = 3, 50, 40, 300
    m_indices = torch.randint(-1, g, (m,), dtype=torch.int32)
    (a, sa), (b, sb) = lhs(m, k), grouped_rhs(g, n, k)
    d = poisoned(m, n)
    ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, m_indices)
    ref = torch.zeros(m, n, dtype=torch.float64)
    for e in range(g):
        rows = m_indices == e
        ref[rows] = ref_nt(a[rows], sa[rows], b[e], sb[e])
    check(d, ref)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_m_grouped_masked_matches_reference_and_leaves_rows_past_mask(out_dtype: torch.dtype) -> None:
    g, mmax, n, k = 4, 70, 130, 576
    masked_m = torch.tensor([0, 70, 1, 33], dtype=torch.int32)
    pairs = [lhs(mmax, k) for _ in range(g)]
    a, sa = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    b, sb = grouped_rhs(g, n, k)
    sentinel = 1234.0
    d = torch.full((g, mmax, n), sentinel, dtype=out_dtype)
    ops.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), d, masked_m, expected_m=32)
    for e in range(g):
        mm = int(masked_m[e])
        if mm:
            check(d[e, :mm], ref_nt(a[e, :mm], sa[e, :mm], b[e], sb[e]))
        assert (d[e, mm:] == sentinel).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ks", [[0, 100, 256, 0, 300], [128], [1, 7, 129]])
def test_k_grouped_contiguous_matches_reference(ks: list[int], out_dtype: torch.dtype) -> None:
    m, n, t = 70, 130, sum(ks)  # dW [M, N] = dY^T [M, T] @ X [T, N] per group
    dy, x = torch.randn(t, m), torch.randn(t, n) * 5
    a, sa = ops.grouped_transposed_per_token_cast_to_fp8(dy, ks)
    b, sb = ops.grouped_transposed_per_token_cast_to_fp8(x, ks)
    d = poisoned(len(ks), m, n, dtype=out_dtype)
    ops.k_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, ks)
    k0 = s0 = 0
    for e, kg in enumerate(ks):
        tiles = cdiv(kg, BLOCK)
        ref = deq(a[:, k0 : k0 + kg], sa[:, s0 : s0 + tiles], 1) @ deq(b[:, k0 : k0 + kg], sb[:, s0 : s0 + tiles], 1).T
        if kg:  # the quantized operands also approximate the fp32 product
            assert ops.calc_diff(ref, dy[k0 : k0 + kg].double().T @ x[k0 : k0 + kg].double()) < TOL
        check(d[e], ref)
        k0, s0 = k0 + kg, s0 + tiles


def test_k_grouped_accumulates_c_in_place_and_tn_alias() -> None:
    ks, m, n = [50, 0, 200], 20, 30
    a, sa = ops.grouped_transposed_per_token_cast_to_fp8(torch.randn(sum(ks), m), ks)
    b, sb = ops.grouped_transposed_per_token_cast_to_fp8(torch.randn(sum(ks), n), ks)
    c = torch.randn(len(ks), m, n)
    expected = c.double().clone()
    k0 = s0 = 0
    for e, kg in enumerate(ks):
        tiles = cdiv(kg, BLOCK)
        expected[e] += deq(a[:, k0 : k0 + kg], sa[:, s0 : s0 + tiles], 1) @ deq(b[:, k0 : k0 + kg], sb[:, s0 : s0 + tiles], 1).T
        k0, s0 = k0 + kg, s0 + tiles
    assert ops.k_grouped_fp8_gemm_tn_contiguous is ops.k_grouped_fp8_gemm_nt_contiguous
    ops.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), c, ks, torch.tensor(ks), c)
    check(c, expected)


def test_grouped_transposed_cast_restarts_tiles_at_group_starts() -> None:
    ks = [3, 130, 0, 1]
    x = torch.randn(sum(ks), 9)
    x[:3] *= 1000  # a tile shared with the next group would blow up its scale
    xt, s = ops.grouped_transposed_per_token_cast_to_fp8(x, ks)
    assert xt.shape == (9, sum(ks)) and s.shape == (9, 1 + 2 + 0 + 1)
    exp_q, exp_s = ops.transposed_per_token_cast_to_fp8(x[3:133].contiguous())
    assert torch.equal(xt[:, 3:133].view(torch.uint8), exp_q.view(torch.uint8))
    assert torch.equal(s[:, 1:3], exp_s)


def test_alignment_getters() -> None:
    assert ops.get_mk_alignment_for_contiguous_layout() >= 1
    assert ops.get_m_alignment_for_contiguous_layout() == ops.get_mk_alignment_for_contiguous_layout()


# ---- bad inputs raise before any kernel runs ----


def _dense_args(m: int = 8, n: int = 16, k: int = 256):
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    return (a, sa), (b, sb), torch.empty(m, n, dtype=torch.bfloat16)


def _bad_dense_cases():
    def wrong_dtype_a():
        (a, sa), b, d = _dense_args()
        ops.fp8_gemm_nt((a.float(), sa), b, d)

    def k_mismatch():
        a, _, d = _dense_args()
        ops.fp8_gemm_nt(a, rhs(16, 384), d)

    def scale_shape_mismatch():
        (a, sa), b, d = _dense_args()
        ops.fp8_gemm_nt((a, sa[:, :1]), b, d)

    def rhs_scale_shape_mismatch():
        a, (b, _sb), d = _dense_args()
        ops.fp8_gemm_nt(a, (b, torch.ones(5, 2)), d)

    def scale_dtype():
        (a, sa), b, d = _dense_args()
        ops.fp8_gemm_nt((a, sa.double()), b, d)

    def non_contiguous_payload():
        a, (_b, sb), d = _dense_args(k=256, n=16)
        wide = torch.empty(16, 512, dtype=torch.float8_e4m3fn)
        ops.fp8_gemm_nt(a, (wide[:, :256], sb), d)

    def wrong_out_dtype():
        a, b, _ = _dense_args()
        ops.fp8_gemm_nt(a, b, torch.empty(8, 16, dtype=torch.float16))

    def wrong_out_shape():
        a, b, _ = _dense_args()
        ops.fp8_gemm_nt(a, b, torch.empty(8, 15))

    def c_with_bf16_out():
        a, b, d = _dense_args()
        ops.fp8_gemm_nt(a, b, d, c=torch.zeros(8, 16))

    def not_a_tuple():
        (a, _sa), b, d = _dense_args()
        ops.fp8_gemm_nt(a, b, d)

    def wrong_device():
        (a, sa), b, d = _dense_args()
        ops.fp8_gemm_nt((a, sa.to("meta")), b, d)

    return [
        (wrong_dtype_a, TypeError, "a must have dtype"),
        (k_mismatch, ValueError, "K mismatch"),
        (scale_shape_mismatch, ValueError, "sa must have shape"),
        (rhs_scale_shape_mismatch, ValueError, "sb must have shape"),
        (scale_dtype, TypeError, "sa must have dtype"),
        (non_contiguous_payload, ValueError, "b must be contiguous"),
        (wrong_out_dtype, TypeError, "d must have dtype"),
        (wrong_out_shape, ValueError, "d must have shape"),
        (c_with_bf16_out, TypeError, "d must have dtype"),
        (not_a_tuple, TypeError, "a must be a"),
        (wrong_device, RuntimeError, "sa must be on a CPU or CUDA"),
    ]


@pytest.mark.parametrize("case", _bad_dense_cases(), ids=lambda c: c[0].__name__)
def test_bad_dense_inputs_raise_clear_errors(case) -> None:
    fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


def test_bad_grouped_inputs_raise_clear_errors() -> None:
    g, n, k = 3, 16, 256
    (a, sa), (b, sb) = lhs(10, k), grouped_rhs(g, n, k)
    d = torch.empty(10, n)
    for bad in (torch.full((10,), g, dtype=torch.int32), torch.full((10,), -2, dtype=torch.int32)):
        with pytest.raises(ValueError, match="m_indices must be in"):
            ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, bad)
    with pytest.raises(ValueError, match="m_indices must have 10"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, torch.zeros(9, dtype=torch.int32))
    with pytest.raises(TypeError, match="m_indices must have dtype"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, torch.zeros(10))
    with pytest.raises(ValueError, match="sb must have shape"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb[:2]), d, torch.zeros(10, dtype=torch.int32))

    am, sam = a[:6].view(g, 2, k), sa[:6].view(g, 2, 2)
    dm = torch.empty(g, 2, n)
    with pytest.raises(ValueError, match="masked_m must be in"):
        ops.m_grouped_fp8_gemm_nt_masked((am, sam), (b, sb), dm, torch.tensor([1, 3, 0], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="K mismatch"):
        ops.m_grouped_fp8_gemm_nt_masked((am[..., :128].contiguous(), sam[..., :1]), (b, sb), dm, torch.ones(g, dtype=torch.int32), 2)

    ks = [100, 156]
    xa = ops.grouped_transposed_per_token_cast_to_fp8(torch.randn(256, 8), ks)
    xb = ops.grouped_transposed_per_token_cast_to_fp8(torch.randn(256, 4), ks)
    with pytest.raises(ValueError, match="ks must sum"):
        ops.k_grouped_fp8_gemm_nt_contiguous(xa, xb, torch.empty(2, 8, 4), [100, 100])
    with pytest.raises(ValueError, match="sa must have shape"):
        ops.k_grouped_fp8_gemm_nt_contiguous(xa, xb, torch.empty(2, 8, 4), [128, 128])
    with pytest.raises(ValueError, match="d must have shape"):
        ops.k_grouped_fp8_gemm_nt_contiguous(xa, xb, torch.empty(3, 8, 4), ks)


@pytest.mark.slow  # importing the fake-tensor machinery alone takes ~10 s
def test_fake_tensor_mode_runs_the_checks_only() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        (a, sa), (b, sb) = (torch.empty(8, 256, dtype=torch.float8_e4m3fn), torch.empty(8, 2)), (
            torch.empty(16, 256, dtype=torch.float8_e4m3fn),
            torch.empty(1, 2),
        )
        d = torch.empty(8, 16)
        assert ops.fp8_gemm_nt((a, sa), (b, sb), d).shape == (8, 16)
