"""The row kernels behind dispatch/combine on every CPU instruction-set path this machine runs
(fixture ``cpu_isas``): the pack (streaming copies on AVX2) moves bytes exactly, and the combine's
per-token sum equals a float64 sum within FP32 accumulation and is the same bits on every path
(up to which NaN a sum of two NaNs keeps)."""

from __future__ import annotations

import pytest
import torch

import ops
from comm import kernels
from tests.harness.tensors import poisoned, randn, wide_range


def _routing(tokens: int, num_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """is_token_in_rank [T, R] (random, some tokens sent nowhere) and its send_pos."""
    in_rank = torch.rand(tokens, num_ranks) < 0.6
    return in_rank, kernels.send_positions(in_rank)


@pytest.mark.parametrize("width", [1, 30, 255, 256, 300, 4096, 4100])
def test_pack_moves_every_row_exactly_on_every_path(cpu_isas: list[str], width: int) -> None:
    tokens, num_ranks = 67, 3
    in_rank, send_pos = _routing(tokens, num_ranks)
    payload = torch.randint(0, 256, (tokens, width), dtype=torch.uint8)
    rows = int(in_rank.sum())
    # The reference: rows by destination rank, then token (plain indexing).
    want = torch.cat([payload[in_rank[:, r]] for r in range(num_ranks)])
    try:
        for isa in cpu_isas:
            ops.set_cpu_isa(isa)
            # an odd offset inside the buffer: destination rows not 32-byte aligned
            buf = torch.full((rows * width + 7,), 0xAB, dtype=torch.uint8)
            out = buf[7:].view(rows, width)
            kernels.pack_into(out, [payload], send_pos)
            assert torch.equal(out, want), f"pack differs on the {isa} path"
            assert torch.equal(buf[:7], torch.full((7,), 0xAB, dtype=torch.uint8)), "wrote before its rows"
    finally:
        ops.set_cpu_isa("auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [1, 13, 16, 100, 2048])
def test_combine_sum_matches_float64_and_is_identical_on_every_path(cpu_isas: list[str], dtype: torch.dtype,
                                                                    hidden: int) -> None:
    tokens, num_ranks = 45, 5
    in_rank, send_pos = _routing(tokens, num_ranks)
    recv = wide_range(int(in_rank.sum()), hidden).clamp(-6e4, 6e4).to(dtype)
    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for r in range(num_ranks):
            if send_pos[t, r] >= 0:
                want[t] += recv[send_pos[t, r]].double()
    outs = {}
    try:
        for isa in cpu_isas:
            ops.set_cpu_isa(isa)
            out = poisoned(tokens, hidden, dtype=dtype)
            kernels.combine_reduce_into(recv, send_pos, out)
            outs[isa] = out
    finally:
        ops.set_cpu_isa("auto")
    first = outs[cpu_isas[0]]
    assert ops.calc_diff(first, want) < 5e-6
    assert torch.equal(first[~in_rank.any(1)], torch.zeros_like(first[~in_rank.any(1)])), "tokens sent nowhere"
    for isa, out in outs.items():
        assert torch.equal(out.view(torch.uint8), first.view(torch.uint8)), f"{isa} path differs in bits"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_combine_sum_of_specials_agrees_on_every_path(cpu_isas: list[str], dtype: torch.dtype) -> None:
    tokens, num_ranks, hidden = 40, 4, 40
    in_rank, send_pos = _routing(tokens, num_ranks)
    recv = randn(int(in_rank.sum()), hidden, scale=1e4).to(dtype)
    flat = recv.view(-1)
    flat[::7], flat[1::11], flat[2::13], flat[3::17] = float("nan"), float("inf"), -float("inf"), -float("nan")
    flat[4::19] = torch.finfo(dtype).max  # sums that overflow to inf
    outs = []
    try:
        for isa in cpu_isas:
            ops.set_cpu_isa(isa)
            out = poisoned(tokens, hidden, dtype=dtype)
            kernels.combine_reduce_into(recv, send_pos, out)
            outs.append(out)
    finally:
        ops.set_cpu_isa("auto")
    nan = outs[0].isnan()
    assert nan.any(), "the case should exercise NaN sums"
    for out in outs[1:]:
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.uint8), outs[0][~nan].view(torch.uint8)), "non-NaN bits differ"
