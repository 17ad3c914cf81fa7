"""FP8 casts: payload and scales bit for bit against the eager reference (ops/reference.py),
on every CPU code path, for the shapes and dtypes DeepSeek-V3 uses and the awkward ones around
them; non-finite inputs; bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

import ops
from ops.reference import dequantize_tiles_reference, quantize_tiles_reference
from tests.harness.tensors import wide_range

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
COLS = [1, 127, 128, 129, 7168]
ROWS = [1, 3, 128, 257]


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """FP8 payloads equal byte for byte; NaN compares by position (the reference may set the sign bit)."""
    a, e = actual.view(torch.uint8), expected.view(torch.uint8)
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    mismatch = (a != e) & ~nan_e
    assert not mismatch.any(), f"{int(mismatch.sum())} of {a.numel()} bytes differ, first at {mismatch.nonzero()[0].tolist()}"


def assert_same_scales(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(actual, expected) or torch.equal(actual.nan_to_num(-1.0), expected.nan_to_num(-1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_ue8m0", [False, True], ids=["fp32_scale", "ue8m0"])
def test_per_token_cast_matches_reference_bit_for_bit(cpu_isas: list[str], dtype: torch.dtype, use_ue8m0: bool) -> None:
    for isa in cpu_isas:
        ops.set_cpu_isa(isa)
        try:
            for rows in ROWS:
                for cols in COLS:
                    x = wide_range(rows, cols, dtype=dtype)
                    q, s = ops.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
                    rq, rs = quantize_tiles_reference(x, 1, 128, use_ue8m0)
                    assert q.dtype == torch.float8_e4m3fn and q.shape == (rows, cols)
                    assert s.shape == (rows, -(-cols // 128))
                    assert_same_scales(s, rs)
                    assert_same_bytes(q, rq)
        finally:
            ops.set_cpu_isa("auto")


@pytest.mark.parametrize("rows", [1, 4096])
def test_per_token_cast_large_shapes(rows: int) -> None:
    x = torch.randn(rows, 7168, dtype=torch.bfloat16) * 3
    q, s = ops.per_token_cast_to_fp8(x)
    rq, rs = quantize_tiles_reference(x, 1, 128)
    assert_same_scales(s, rs)
    assert_same_bytes(q, rq)


def test_per_token_cast_keeps_leading_dims() -> None:
    x = torch.randn(2, 3, 5, 300, dtype=torch.bfloat16)
    q, s = ops.per_token_cast_to_fp8(x)
    assert q.shape == (2, 3, 5, 300) and s.shape == (2, 3, 5, 3)
    rq, rs = quantize_tiles_reference(x.reshape(-1, 300), 1, 128)
    assert_same_bytes(q.reshape(-1, 300), rq)
    assert_same_scales(s.reshape(-1, 3), rs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_ue8m0", [False, True], ids=["fp32_scale", "ue8m0"])
def test_per_block_cast_matches_reference_bit_for_bit(cpu_isas: list[str], dtype: torch.dtype, use_ue8m0: bool) -> None:
    for isa in cpu_isas:
        ops.set_cpu_isa(isa)
        try:
            for rows, cols in [(1, 1), (127, 129), (128, 128), (300, 7168), (2112, 100)]:
                w = wide_range(rows, cols, dtype=dtype)
                q, s = ops.per_block_cast_to_fp8(w, use_ue8m0=use_ue8m0)
                rq, rs = quantize_tiles_reference(w, 128, 128, use_ue8m0)
                assert s.shape == (-(-rows // 128), -(-cols // 128))
                assert_same_scales(s, rs)
                assert_same_bytes(q, rq)
        finally:
            ops.set_cpu_isa("auto")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_cast_quantizes_columns_along_tokens(dtype: torch.dtype) -> None:
    for rows, cols in [(1, 1), (129, 7), (256, 129), (1000, 64)]:
        x = wide_range(rows, cols, dtype=dtype)
        qt, st = ops.transposed_per_token_cast_to_fp8(x)
        rq, rs = quantize_tiles_reference(x.t().contiguous(), 1, 128)
        assert qt.shape == (cols, rows) and qt.is_contiguous()
        assert_same_scales(st, rs)
        assert_same_bytes(qt, rq)


def test_ue8m0_scales_are_powers_of_two_at_or_above_the_exact_scale() -> None:
    x = torch.randn(64, 1024) * torch.rand(64, 1) * 100
    _, exact = ops.per_token_cast_to_fp8(x)
    _, pow2 = ops.per_token_cast_to_fp8(x, use_ue8m0=True)
    mantissa, _ = torch.frexp(pow2)
    assert torch.all(mantissa == 0.5), "UE8M0 scales must be powers of two"
    assert torch.all(pow2 >= exact) and torch.all(pow2 < 2 * exact)


def test_round_trip_error_is_within_e4m3_precision() -> None:
    # DeepSeek-V3 report, section 3.3: 1x128 tiles keep the quantization error of E4M3 (3
    # mantissa bits: relative step 2^-3 at most) local to each tile.
    x = torch.randn(256, 7168) * torch.logspace(-3, 3, 7168)
    q, s = ops.per_token_cast_to_fp8(x)
    back = dequantize_tiles_reference(q, s, 1, 128)
    assert ops.calc_diff(back, x.double()) < 1e-3


def test_amax_floor_applies_to_tiny_tiles() -> None:
    x = torch.full((2, 128), 1e-7) * torch.randn(2, 128).sign()
    _, s = ops.per_token_cast_to_fp8(x)
    assert torch.all(s == torch.tensor(1e-4, dtype=torch.float32) / 448)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_poison_only_their_tile(bad: float) -> None:
    x = torch.randn(3, 300)
    x[1, 130] = bad  # row 1, second tile (columns 128..255)
    q, s = ops.per_token_cast_to_fp8(x)
    back = dequantize_tiles_reference(q, s, 1, 128)
    assert torch.isnan(back[1, 128:256]).all(), "the tile holding a non-finite value dequantizes to NaN"
    finite = torch.ones_like(back, dtype=torch.bool)
    finite[1, 128:256] = False
    assert torch.isfinite(back[finite]).all(), "other tiles are unaffected"
    if math.isnan(bad):
        assert q.view(torch.uint8)[1, 130] == 0x7F, "payload NaN is the byte 0x7F"


def test_empty_inputs_give_empty_outputs() -> None:
    q, s = ops.per_token_cast_to_fp8(torch.empty(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    q, s = ops.per_token_cast_to_fp8(torch.empty(4, 0))
    assert q.shape == (4, 0) and s.shape == (4, 0)
    q, s = ops.per_block_cast_to_fp8(torch.empty(0, 0))
    assert q.shape == (0, 0) and s.shape == (0, 0)
    qt, st = ops.transposed_per_token_cast_to_fp8(torch.empty(0, 5))
    assert qt.shape == (5, 0) and st.shape == (5, 0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.per_token_cast_to_fp8(torch.randn(4, 8).double()), TypeError, "x must have dtype"),
        (lambda: ops.per_token_cast_to_fp8(torch.randint(0, 5, (4, 8))), TypeError, "x must have dtype"),
        (lambda: ops.per_token_cast_to_fp8(torch.tensor(1.0)), ValueError, "x must have"),
        (lambda: ops.per_block_cast_to_fp8(torch.randn(2, 3, 4)), ValueError, "w must have 2 dimensions"),
        (lambda: ops.per_token_cast_to_fp8(torch.randn(8, 4).t()), ValueError, "x must be contiguous"),
        (lambda: ops.per_token_cast_to_fp8([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: ops.per_token_cast_to_fp8(torch.randn(4, 8), group_size=0), ValueError, "group_size must be a positive int"),
        (lambda: ops.per_block_cast_to_fp8(torch.randn(4, 8), block_size=1.5), ValueError, "block_size"),
        (lambda: ops.per_token_cast_to_fp8(torch.randn(4, 8, device="meta")), RuntimeError, "CPU or CUDA"),
    ],
    ids=["float64", "int", "scalar", "3d_weight", "non_contiguous", "not_tensor", "group0", "block_float", "meta"],
)
def test_bad_inputs_raise_naming_the_argument(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_cuda_input_without_cuda_build_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ops.quant

    monkeypatch.setattr(ops.quant, "built_with_cuda", lambda: False)
    with FakeTensorMode(), pytest.raises(RuntimeError, match="built without CUDA"):
        ops.per_token_cast_to_fp8(torch.empty(2, 2, device="cuda"))  # a fake tensor: no GPU needed


def test_native_op_rejects_unsupported_dtype_itself() -> None:
    # The C++ kernel never trusts its caller: a direct torch.ops call with float64 raises.
    with pytest.raises(RuntimeError, match="not implemented for 'Double'"):
        torch.ops.dsv3.cast_to_fp8_tiles(torch.randn(2, 4, dtype=torch.float64), 1, 128, False)


def test_fake_implementation_gives_shapes_without_computing() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(300, 257, dtype=torch.bfloat16)
        q, s = ops.per_token_cast_to_fp8(x)
        qt, st = ops.transposed_per_token_cast_to_fp8(x)
        qb, sb = ops.per_block_cast_to_fp8(x)
    assert q.shape == (300, 257) and s.shape == (300, 3) and q.dtype == torch.float8_e4m3fn
    assert qt.shape == (257, 300) and st.shape == (257, 3)
    assert qb.shape == (300, 257) and sb.shape == (3, 3)


def test_set_cpu_isa_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="isa must be"):
        ops.set_cpu_isa("sse9")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_ue8m0", [False, True], ids=["fp32_scale", "ue8m0"])
def test_cuda_casts_equal_cpu_casts_bit_for_bit(dtype: torch.dtype, use_ue8m0: bool) -> None:
    for rows, cols in [(1, 1), (3, 127), (128, 129), (4096, 7168), (1000, 100)]:
        x = wide_range(rows, cols, dtype=dtype)
        x[0, 0] = float("nan")
        for fn in (ops.per_token_cast_to_fp8, ops.per_block_cast_to_fp8):
            q_cpu, s_cpu = fn(x, use_ue8m0=use_ue8m0)
            q_gpu, s_gpu = fn(x.cuda(), use_ue8m0=use_ue8m0)
            assert_same_scales(s_gpu.cpu(), s_cpu)
            assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8))
        qt_cpu, st_cpu = ops.transposed_per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
        qt_gpu, st_gpu = ops.transposed_per_token_cast_to_fp8(x.cuda(), use_ue8m0=use_ue8m0)
        assert_same_scales(st_gpu.cpu(), st_cpu)
        assert torch.equal(qt_gpu.cpu().view(torch.uint8), qt_cpu.view(torch.uint8))
