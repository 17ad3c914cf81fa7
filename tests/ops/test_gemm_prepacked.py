"""Pre-packed FP8 weights (ops.gemm.prepack_fp8_weight) against the float64 reference and against
the unpacked call: the packed path must give the same bits as passing (b, sb), on every CPU
kernel set, for both of the CPU GEMM's paths (GEMV for M <= 16, packed tiles above), for the
dense GEMM and for the m-grouped GEMMs with a packed [G, N, K] expert weight."""

from __future__ import annotations

import pytest
import torch

import ops
from ops._native import native
from ops.gemm import PackedFP8Weight, prepack_fp8_weight
from tests.harness.tensors import poisoned
from tests.ops.test_gemm import BLOCK, ISA_SHAPES, cdiv, check, lhs, ref_nt, rhs
from tests.ops.test_gemm import SHAPES as GEMM_SHAPES

# Issue 3's M, N and K values (test_gemm.py's fast set; its large products are slow there), a
# 17-row GEMM on a 7168-deep weight, and the remainder shapes of the CPU kernels' tiles and slabs.
SHAPES = [s for s in GEMM_SHAPES if not hasattr(s, "marks")] + [(17, 2112, 7168), *ISA_SHAPES]


@pytest.mark.parametrize("per_row", [False, True], ids=["block_scales", "row_scales"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_prepacked_matches_reference_and_unpacked(m: int, n: int, k: int, per_row: bool) -> None:
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k, per_row=per_row)
    packed = prepack_fp8_weight((b, sb))
    assert isinstance(packed, PackedFP8Weight) and packed.shape == (n, k)
    out_dtype = torch.bfloat16 if (m + n) % 2 else torch.float32
    d = poisoned(m, n, dtype=out_dtype)
    assert ops.fp8_gemm_nt((a, sa), packed, d) is d
    check(d, ref_nt(a, sa, b, sb))
    plain = poisoned(m, n, dtype=out_dtype)
    ops.fp8_gemm_nt((a, sa), (b, sb), plain)
    assert torch.equal(d, plain)


@pytest.mark.parametrize("m,n,k", [(40, 530, 385), (3, 37, 300)], ids=["packed", "gemv"])
def test_panels_made_on_any_kernel_set_work_on_every_other(cpu_isas: list[str], m: int, n: int, k: int) -> None:
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    ref = ref_nt(a, sa, b, sb)
    try:
        for pack_isa in cpu_isas:
            ops.set_cpu_isa(pack_isa)
            packed = prepack_fp8_weight((b, sb))
            for isa in cpu_isas:
                ops.set_cpu_isa(isa)
                d = poisoned(m, n)
                ops.fp8_gemm_nt((a, sa), packed, d)
                check(d, ref)
    finally:
        ops.set_cpu_isa("auto")


def test_c_is_accumulated_with_a_packed_weight() -> None:
    m, n, k = 65, 130, 576
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    packed = prepack_fp8_weight((b, sb))
    c = torch.randn(m, n) * 100
    ref = c.double() + ref_nt(a, sa, b, sb)
    ops.fp8_gemm_nt((a, sa), packed, c, c=c)
    check(c, ref)


def test_scales_are_read_at_every_call() -> None:
    # Scales are applied at promotion, never folded into the panels: new values in sb count.
    m, n, k = 40, 200, 300
    (a, sa), (b, sb) = lhs(m, k), rhs(n, k)
    packed = prepack_fp8_weight((b, sb))
    sb.mul_(torch.rand_like(sb) + 0.5)
    d = poisoned(m, n)
    ops.fp8_gemm_nt((a, sa), packed, d)
    check(d, ref_nt(a, sa, b, sb))


@pytest.mark.parametrize("m", [3, 40], ids=["gemv", "packed"])
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_payload_byte_in_a_packed_weight_gives_nan(m: int, code: int) -> None:
    (a, sa), (b, sb) = lhs(m, 200), rhs(5, 200)
    b.view(torch.uint8)[4, 150] = code
    b.view(torch.uint8)[2, 199] = code
    packed = prepack_fp8_weight((b, sb))
    d = torch.empty(m, 5)
    ops.fp8_gemm_nt((a, sa), packed, d)
    assert torch.isnan(d[:, [2, 4]]).all() and not torch.isnan(d[:, [0, 1, 3]]).any()


def test_every_e4m3_value_survives_packing() -> None:
    # All 254 finite codes (subnormals included), one nonzero term per output, unit scales:
    # d[m, n] = b[n] exactly on the packed path (254 rows of A).
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).double()
    m = len(codes)
    a = torch.zeros(m, 128, dtype=torch.uint8)
    a[:, 5] = 0x38  # 1.0
    b = torch.zeros(len(codes), 128, dtype=torch.uint8)
    b[:, 5] = codes
    sa, sb = torch.ones(m, 1), torch.ones(cdiv(len(codes), BLOCK), 1)
    packed = prepack_fp8_weight((b.view(torch.float8_e4m3fn), sb))
    d = poisoned(m, len(codes))
    ops.fp8_gemm_nt((a.view(torch.float8_e4m3fn), sa), packed, d)
    assert torch.equal(d.double(), values.expand(m, -1))


# ---- misuse raises clear errors ----


def test_weight_changed_after_packing_is_refused() -> None:
    (a, sa), (b, sb) = lhs(20, 256), rhs(16, 256)
    packed = prepack_fp8_weight((b, sb))
    b.view(torch.uint8)[0, 0] ^= 1  # an in-place change the panels do not have
    with pytest.raises(RuntimeError, match="modified in place after prepack_fp8_weight"):
        ops.fp8_gemm_nt((a, sa), packed, torch.empty(20, 16))


def test_inference_tensors_pack_without_a_version_check() -> None:
    # loaded weights are often inference tensors, which have no version counter
    (a, sa) = lhs(20, 256)
    with torch.inference_mode():
        b, sb = rhs(16, 256)
    assert b.is_inference()
    d, d_ref = torch.empty(20, 16), torch.empty(20, 16)
    ops.fp8_gemm_nt((a, sa), prepack_fp8_weight((b, sb)), d)
    ops.fp8_gemm_nt((a, sa), (b, sb), d_ref)
    assert torch.equal(d, d_ref)


def test_bad_prepack_and_packed_uses_raise() -> None:
    (a, sa), (b, sb) = lhs(20, 256), rhs(16, 256)
    packed = prepack_fp8_weight((b, sb))
    with pytest.raises(TypeError, match="b must be a"):
        prepack_fp8_weight(b)
    with pytest.raises(TypeError, match="b must have dtype"):
        prepack_fp8_weight((b.float(), sb))
    with pytest.raises(ValueError, match="b must be contiguous"):
        prepack_fp8_weight((torch.empty(16, 512, dtype=torch.float8_e4m3fn)[:, :256], sb))
    with pytest.raises(ValueError, match="sb must have shape"):
        prepack_fp8_weight((b, torch.ones(3, 2)))
    with pytest.raises(RuntimeError, match="sb must be on a CPU or CUDA"):
        prepack_fp8_weight((b, sb.to("meta")))
    with pytest.raises(ValueError, match="K mismatch"):
        ops.fp8_gemm_nt(lhs(20, 384), packed, torch.empty(20, 16))
    with pytest.raises(ValueError, match="d must have shape"):
        ops.fp8_gemm_nt((a, sa), packed, torch.empty(20, 15))
    with pytest.raises(TypeError, match="accepted only as the b of fp8_gemm_nt"):
        ops.fp8_gemm_nt(packed, (b, sb), torch.empty(16, 16))
    with pytest.raises(TypeError, match="accepted only as the b of fp8_gemm_nt"):
        ops.fp8_gemm_nn((a, sa), packed, torch.empty(20, 16))
    with pytest.raises(ValueError, match="needs a grouped"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, torch.empty(20, 16), torch.zeros(20, dtype=torch.int32))


def test_packed_path_reads_the_panels_not_b() -> None:
    # Proof that M > 16 uses the one-time decode: doubling the panels (exact, a power of two)
    # doubles the result, while the GEMV path (M <= 16) streams b's FP8 bytes and is unchanged.
    (b, sb) = rhs(40, 300)
    packed = prepack_fp8_weight((b, sb))
    packed.panels.mul_(2)
    for m, factor in ((40, 2), (5, 1)):
        a, sa = lhs(m, 300)
        plain, d = torch.empty(m, 40), torch.empty(m, 40)
        ops.fp8_gemm_nt((a, sa), (b, sb), plain)
        ops.fp8_gemm_nt((a, sa), packed, d)
        assert torch.equal(d, plain * factor), m


# ---- grouped weights (MoE experts): m_grouped_fp8_gemm_nt_contiguous and _masked ----


def grouped_weight(g: int, n: int, k: int, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [rhs(n, k, per_row=per_row) for _ in range(g)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def masked_lhs(g: int, mmax: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked layout's (a [G, Mmax, K], sa [G, Mmax, ceil(K/128)])."""
    a, sa = lhs(g * mmax, k)
    return a.view(g, mmax, k), sa.view(g, mmax, -1)


def contiguous_indices(sizes: list[int]) -> torch.Tensor:
    """Groups in order with padding rows (-1) before, between and after them."""
    parts = [torch.full((3,), -1, dtype=torch.int32)]
    for e, rows in enumerate(sizes):
        parts += [torch.full((rows,), e, dtype=torch.int32), torch.full((e % 2,), -1, dtype=torch.int32)]
    return torch.cat(parts)


def grouped_ref(a, sa, b, sb, m_indices) -> torch.Tensor:
    ref = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for e in range(b.shape[0]):
        rows = m_indices == e
        if rows.any():
            ref[rows] = ref_nt(a[rows], sa[rows], b[e], sb[e])
    return ref


# Groups of 0 rows (empty), of <= 16 rows (GEMV: reads b) and > 16 rows (reads the panels); N and
# K with tails of the 16-column panels, 128-row scale blocks and 128-K blocks.
@pytest.mark.parametrize(
    "sizes,n,k,per_row",
    [([0, 5, 40, 0, 17], 130, 300, False), ([20, 1, 0, 33], 37, 576, True)],
    ids=["block_scales", "row_scales"],
)
def test_grouped_contiguous_packed_is_bit_identical_on_every_kernel_set(
    cpu_isas: list[str], sizes: list[int], n: int, k: int, per_row: bool
) -> None:
    m_indices = contiguous_indices(sizes)
    m = m_indices.numel()
    (a, sa), (b, sb) = lhs(m, k), grouped_weight(len(sizes), n, k, per_row)
    ref = grouped_ref(a, sa, b, sb, m_indices)
    try:
        for i, isa in enumerate(cpu_isas):
            ops.set_cpu_isa(isa)
            out_dtype = (torch.bfloat16, torch.float32)[i % 2]
            packed = prepack_fp8_weight((b, sb))
            assert packed.shape == (len(sizes), n, k) and packed.num_groups == len(sizes)
            d, plain = poisoned(m, n, dtype=out_dtype), poisoned(m, n, dtype=out_dtype)
            assert ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, d, m_indices) is d
            ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), plain, m_indices)
            check(d, ref)
            assert torch.equal(d, plain), isa
            assert (d[m_indices == -1] == 0).all()
    finally:
        ops.set_cpu_isa("auto")


def test_grouped_masked_packed_is_bit_identical_and_leaves_rows_past_mask(cpu_isas: list[str]) -> None:
    g, mmax, n, k = 5, 40, 130, 300
    masked_m = torch.tensor([0, 40, 1, 16, 17], dtype=torch.int32)  # empty, packed, GEMV, GEMV, packed
    a, sa = masked_lhs(g, mmax, k)
    b, sb = grouped_weight(g, n, k)
    sentinel = 1234.0
    try:
        for isa in cpu_isas:
            ops.set_cpu_isa(isa)
            packed = prepack_fp8_weight((b, sb))
            d, plain = (torch.full((g, mmax, n), sentinel, dtype=torch.bfloat16) for _ in range(2))
            assert ops.m_grouped_fp8_gemm_nt_masked((a, sa), packed, d, masked_m, expected_m=16) is d
            ops.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), plain, masked_m, expected_m=16)
            assert torch.equal(d, plain), isa
            for e, mm in enumerate(masked_m.tolist()):
                if mm:
                    check(d[e, :mm], ref_nt(a[e, :mm], sa[e, :mm], b[e], sb[e]))
                assert (d[e, mm:] == sentinel).all()
    finally:
        ops.set_cpu_isa("auto")


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_payload_byte_in_a_packed_grouped_weight_stays_in_its_group(code: int) -> None:
    g, n, k = 3, 5, 200
    b, sb = grouped_weight(g, n, k)
    b.view(torch.uint8)[1, 4, 150] = code  # group 1, column 4 of d
    packed = prepack_fp8_weight((b, sb))
    m_indices = contiguous_indices([20, 20, 3]) if code == 0x7F else contiguous_indices([3, 3, 20])
    m_indices[-2:] = 1  # a few group-1 rows also at the end (a GEMV run when group 1 is packed)
    a, sa = lhs(m_indices.numel(), k)
    d = torch.empty(m_indices.numel(), n)
    ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, d, m_indices)
    in_group = m_indices == 1
    assert torch.isnan(d[in_group, 4]).all() and not torch.isnan(d[in_group][:, :4]).any()
    assert not torch.isnan(d[~in_group]).any()

    am, sam = masked_lhs(g, 20, k)
    dm = torch.empty(g, 20, n)
    ops.m_grouped_fp8_gemm_nt_masked((am, sam), packed, dm, torch.tensor([20, 20, 3], dtype=torch.int32), 20)
    assert torch.isnan(dm[1, :, 4]).all() and not torch.isnan(dm[1, :, :4]).any()
    assert not torch.isnan(dm[0]).any() and not torch.isnan(dm[2, :3]).any()


def test_grouped_gemms_read_the_panels_of_each_group() -> None:
    # Proof that groups with > 16 rows use the one-time decode (so the bit-identity above is not
    # two runs of the same unpacked code): doubling group 1's panels (exact) doubles its rows;
    # GEMV-sized groups (<= 16 rows) stream b's FP8 bytes and are unchanged.
    g, n, k = 3, 40, 300
    b, sb = grouped_weight(g, n, k)
    packed = prepack_fp8_weight((b, sb))
    packed.panels[1].mul_(2)
    m_indices = contiguous_indices([30, 30, 5])
    a, sa = lhs(m_indices.numel(), k)
    plain, d = torch.empty(m_indices.numel(), n), torch.empty(m_indices.numel(), n)
    ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), plain, m_indices)
    ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, d, m_indices)
    factor = torch.where(m_indices == 1, 2.0, 1.0)[:, None]
    assert torch.equal(d, plain * factor)

    packed.panels[2].mul_(4)  # group 2 has 5 rows: GEMV, unchanged
    am, sam = masked_lhs(g, 30, k)
    masked_m = torch.tensor([30, 30, 5], dtype=torch.int32)
    plain_m, dm = torch.zeros(g, 30, n), torch.zeros(g, 30, n)
    ops.m_grouped_fp8_gemm_nt_masked((am, sam), (b, sb), plain_m, masked_m, 30)
    ops.m_grouped_fp8_gemm_nt_masked((am, sam), packed, dm, masked_m, 30)
    assert torch.equal(dm, plain_m * torch.tensor([1.0, 2.0, 1.0])[:, None, None])


def test_bad_grouped_packing_and_packed_uses_raise() -> None:
    g, m, n, k = 3, 20, 16, 256
    (a, sa), (b, sb) = lhs(m, k), grouped_weight(g, n, k)
    m_indices = torch.zeros(m, dtype=torch.int32)
    packed = prepack_fp8_weight((b, sb))
    assert "G=3" in repr(packed)
    with pytest.raises(ValueError, match=r"b must be \[N, K\] \(dense\) or \[G, N, K\]"):
        prepack_fp8_weight((b[None], sb[None]))
    with pytest.raises(ValueError, match="sb must have shape"):
        prepack_fp8_weight((b, sb[0]))
    with pytest.raises(ValueError, match="needs a dense"):
        ops.fp8_gemm_nt((a, sa), packed, torch.empty(m, n))
    with pytest.raises(TypeError, match="accepted only as the b"):
        ops.m_grouped_fp8_gemm_nt_contiguous(packed, (b, sb), torch.empty(m, n), m_indices)
    with pytest.raises(ValueError, match="K mismatch"):
        ops.m_grouped_fp8_gemm_nt_contiguous(lhs(m, 384), packed, torch.empty(m, n), m_indices)
    with pytest.raises(ValueError, match=r"m_indices must be in \[-1, 3\)"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, torch.empty(m, n), torch.full((m,), 3))
    am, sam = masked_lhs(2, 10, k)
    with pytest.raises(ValueError, match="b must have G=2"):
        ops.m_grouped_fp8_gemm_nt_masked((am, sam), packed, torch.empty(2, 10, n), torch.ones(2, dtype=torch.int32), 1)
    # the native ops check the panels' shape themselves
    with pytest.raises(RuntimeError, match="b_panels"):
        native.m_grouped_fp8_gemm_nt_contiguous_prepacked_out(a, sa, b, sb, packed.panels[:2], m_indices,
                                                              torch.empty(m, n))
    with pytest.raises(RuntimeError, match="b_panels"):
        native.m_grouped_fp8_gemm_nt_masked_prepacked_out(am, sam, b[:2], sb[:2], packed.panels, torch.ones(2, dtype=torch.int32),
                                                          1, torch.empty(2, 10, n))


def test_grouped_weight_changed_after_packing_is_refused() -> None:
    g, n, k = 2, 16, 256
    b, sb = grouped_weight(g, n, k)
    packed = prepack_fp8_weight((b, sb))
    b.view(torch.uint8)[1, 0, 0] ^= 1  # an in-place change the panels do not have
    a, sa = lhs(20, k)
    with pytest.raises(RuntimeError, match="modified in place after prepack_fp8_weight"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, torch.empty(20, n), torch.zeros(20, dtype=torch.int32))
    am, sam = masked_lhs(g, 10, k)
    with pytest.raises(RuntimeError, match="modified in place after prepack_fp8_weight"):
        ops.m_grouped_fp8_gemm_nt_masked((am, sam), packed, torch.empty(g, 10, n), torch.ones(g, dtype=torch.int32), 1)


def test_packed_weight_with_a_non_cpu_lhs_is_refused_before_any_kernel() -> None:
    # The panels exist only for the CPU kernels: a packed weight next to an operand on another
    # device (meta here; CUDA in the test below) gets a clear error, not a device mismatch.
    g, m, n, k = 2, 20, 16, 256
    (a, sa), (b, sb) = lhs(m, k), grouped_weight(g, n, k)
    packed, dense = prepack_fp8_weight((b, sb)), prepack_fp8_weight((b[0], sb[0]))
    a_meta, sa_meta = a.to("meta"), sa.to("meta")
    with pytest.raises(RuntimeError, match=r"for the CPU kernels only.*a is on meta"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a_meta, sa_meta), packed, torch.empty(m, n), torch.zeros(m))
    with pytest.raises(RuntimeError, match=r"for the CPU kernels only.*a is on meta"):
        ops.m_grouped_fp8_gemm_nt_masked((a_meta.view(g, 10, k), sa_meta.view(g, 10, -1)), packed,
                                         torch.empty(g, 10, n), torch.ones(g), 1)
    with pytest.raises(RuntimeError, match=r"for the CPU kernels only.*a is on meta"):
        ops.fp8_gemm_nt((a_meta, sa_meta), dense, torch.empty(m, n))


@pytest.mark.cuda
def test_packed_weight_is_refused_by_the_cuda_gemms() -> None:
    g, m, n, k = 2, 20, 16, 256
    (a, sa), (b, sb) = lhs(m, k), grouped_weight(g, n, k)
    packed = prepack_fp8_weight((b, sb))
    a, sa = a.cuda(), sa.cuda()
    with pytest.raises(RuntimeError, match=r"for the CPU kernels only.*a is on cuda"):
        ops.m_grouped_fp8_gemm_nt_contiguous((a, sa), packed, torch.empty(m, n, device="cuda"),
                                             torch.zeros(m, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match=r"for the CPU kernels only.*a is on cuda"):
        ops.m_grouped_fp8_gemm_nt_masked((a.view(g, 10, k), sa.view(g, 10, -1)), packed,
                                         torch.empty(g, 10, n, device="cuda"),
                                         torch.ones(g, dtype=torch.int32, device="cuda"), 1)
    with pytest.raises(RuntimeError, match="packs for the CPU GEMM"):
        prepack_fp8_weight((b.cuda(), sb.cuda()))
