"""recv_x and combined_x live in reused memory (comm/memory.py): what the caller still holds is
never overwritten by a later dispatch or combine, what it dropped is reused, and an async call's
output stays reserved until its exchange has completed, even when the caller dropped it early.
Sizes are chosen above the cache's 1 MiB floor so the cache is really in play."""

from __future__ import annotations

import random

import pytest
import torch

import ops
from comm import all_to_all, memory
from tests.comm.reference import Case, make_topk, make_x, make_z, reference_combine, reference_dispatch
from tests.harness.distributed import run_distributed


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a1 <= b0 or b1 <= a0


def _case(seed: int, world: int) -> Case:
    return Case(seed=seed, tokens=tuple(1024 + 64 * r for r in range(world)), hidden=1024, k=4, experts_per_rank=2)


def held_outputs_survive_later_calls(rank: int, world: int, seeds: tuple[int, int]) -> dict:
    memory.empty_cache()  # buffers other tests left in this worker would be better fits
    buf = all_to_all.Buffer()
    first, second = (_case(s, world) for s in seeds)
    outs = []
    for case in (first, second):
        idx, w = make_topk(case, rank)
        recv_x, _, _, _, handle, _ = buf.dispatch(make_x(case, rank), topk_idx=idx, topk_weights=w,
                                                  num_experts=case.num_experts)
        z = make_z(case, rank, torch.arange(recv_x.shape[0]))
        combined, _, _ = buf.combine(z, handle)
        outs.append((case, recv_x, combined))
    (_, recv1, comb1), (c2, recv2, comb2) = outs
    # The first call's outputs, still held, are intact and share no memory with the second's.
    assert _disjoint(recv1, recv2) and _disjoint(comb1, comb2) and _disjoint(recv1, comb2)
    for case, recv_x, combined in outs:
        want = reference_dispatch(case, rank, lambda s, rows, case=case: [make_x(case, s, rows=rows)]).rows[0]
        assert torch.equal(recv_x, want), "a held recv_x was overwritten"
        want_c = reference_combine(case, rank, lambda d, rows, case=case: make_z(case, d, rows))
        assert ops.calc_diff(combined, want_c) < 5e-6, "a held combined_x was overwritten"
    # Dropped outputs are reused: a third dispatch lands in the memory of the dropped first one.
    span = _span(recv1)
    del outs, recv1, comb1
    idx, w = make_topk(c2, rank)
    recv3, *_ = buf.dispatch(make_x(c2, rank), topk_idx=idx, topk_weights=w, num_experts=c2.num_experts)
    assert torch.equal(recv3, recv2)
    return {"reused": _span(recv3) == span}


@pytest.mark.parametrize("world", [2, 3])
def test_held_recv_x_and_combined_x_are_never_overwritten_and_dropped_ones_are_reused(world: int) -> None:
    seeds = (random.randrange(2**31), random.randrange(2**31))
    results = run_distributed(held_outputs_survive_later_calls, world, seeds, timeout=180)
    assert all(r["reused"] for r in results), results


def dropped_async_output_stays_reserved(rank: int, world: int, seed: int) -> dict:
    buf = all_to_all.Buffer()
    case = _case(seed, world)
    idx, w = make_topk(case, rank)
    x = make_x(case, rank)
    _, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=case.num_experts)
    recv_x, event = buf.dispatch(x, handle=handle, async_finish=True)[0::5]
    span = _span(recv_x)
    del recv_x  # dropped before the exchange completed: the exchange still writes into it
    spans = []
    for _ in range(2):  # while it may still be in flight, no later output may land there
        other, *_ = buf.dispatch(x * 2, handle=handle)
        spans.append(_span(other))
        other.fill_(float("nan"))
    event.current_stream_wait()
    (a0, a1) = span
    return {"clear": all(b1 <= a0 or a1 <= b0 for b0, b1 in spans)}


@pytest.mark.parametrize("world", [2, 3])
def test_an_async_output_dropped_before_its_wait_is_not_reused_while_in_flight(world: int) -> None:
    results = run_distributed(dropped_async_output_stays_reserved, world, random.randrange(2**31), timeout=180)
    assert all(r["clear"] for r in results), results
