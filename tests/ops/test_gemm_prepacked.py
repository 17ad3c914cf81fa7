"""Pre-packed FP8 weights (ops.gemm.prepack_fp8_weight) against the float64 reference and against
the unpacked call: the packed path must give the same bits as passing (b, sb), on every CPU
kernel set, for both of the CPU GEMM's paths (GEMV for M <= 16, packed tiles above)."""

from __future__ import annotations

import pytest
import torch

import ops
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
    with pytest.raises(TypeError, match="accepted only as fp8_gemm_nt's b"):
        ops.fp8_gemm_nt(packed, (b, sb), torch.empty(16, 16))
    with pytest.raises(TypeError, match="accepted only as fp8_gemm_nt's b"):
        ops.fp8_gemm_nn((a, sa), packed, torch.empty(20, 16))
    with pytest.raises(TypeError, match="accepted only as fp8_gemm_nt's b"):
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
