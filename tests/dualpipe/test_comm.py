"""The order-matched P2P plan (NCCL's matching rule) and its self-checks, without processes.

The multi-process tests (test_pipelines.py, test_errors.py) run every message on tag 0, so gloo
matches by posting order exactly like NCCL; these pin down the plan they rely on.
"""

from __future__ import annotations

import pytest
import torch

from dualpipe import dualpipe_schedule, dualpipev_schedule, one_f_one_b_schedule, zb1p_schedule
from dualpipe.comm import ACT, GRAD, P2P, RoundPlan
from dualpipe.executor import step_actions, transfer_plan

SCHEDULES = [
    (dualpipe_schedule, 2, 4), (dualpipe_schedule, 4, 10), (dualpipe_schedule, 6, 12),
    (dualpipev_schedule, 1, 3), (dualpipev_schedule, 3, 7), (dualpipev_schedule, 4, 8),
    (one_f_one_b_schedule, 3, 5), (zb1p_schedule, 4, 6),
]


def _consumed(sched, rank: int, training: bool) -> set[tuple[int, int, int]]:
    """The remote transfers ``rank``'s actions wait for, from the actions' data dependencies:
    F(s, c) needs stage s-1's activations, B(s, c) stage s+1's gradients, when held elsewhere."""
    need = set()
    for a in step_actions(sched, rank, training):
        halves = [(a.kind if a.kind != "FB" else "F", a.stage, a.chunk)]
        if a.kind == "FB":
            halves.append(("B", *a.bwd))
        for kind, st, c in halves:
            if kind == "F" and st > 0 and sched.place(st - 1, c).rank != rank:
                need.add((ACT, st, c))
            if kind == "B" and st < sched.num_stages - 1 and sched.place(st + 1, c).rank != rank:
                need.add((GRAD, st, c))
    return need


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fn,ranks,chunks", SCHEDULES)
def test_plan_pairs_every_send_with_one_receive_in_sender_order(fn, ranks: int, chunks: int, training: bool) -> None:
    sched = fn(ranks, chunks)
    plans = [transfer_plan(sched, r, training) for r in range(ranks)]
    for r, (incoming, outgoing) in enumerate(plans):
        # Each peer's list is exactly its sends to r, in its order (NCCL pairs them by position).
        for p in range(ranks):
            assert incoming.get(p, []) == [k for k, dst in plans[p][1] if dst == r], (r, p)
        # What r receives is what its actions consume, each once; what it sends goes elsewhere.
        received = [k for keys in incoming.values() for k in keys]
        assert len(received) == len(set(received))
        assert set(received) == _consumed(sched, r, training), r
        assert all(dst != r for _, dst in outgoing)
        # A transfer's sender is the rank that runs the producing stage.
        for (kind, st, c), dst in outgoing:
            producer = st - 1 if kind == ACT else st + 1
            assert sched.place(producer, c).rank == r and sched.place(st, c).rank == dst


def test_send_out_of_the_planned_order_is_refused_before_any_message() -> None:
    plan = [((ACT, 1, 0), 1), ((ACT, 1, 1), 1)]
    rounds = RoundPlan([(plan, [])], [1.0], [], {key: 1.0 for key, _ in plan})
    p2p = P2P(None, [0, 1], torch.device("cpu"), 2, {}, plan, rounds)
    with pytest.raises(RuntimeError, match="out of the planned order"):
        p2p.send((ACT, 1, 1), 1, [torch.randn(2)])
    assert p2p.out == {}
    with pytest.raises(RuntimeError, match="out of the planned order"):
        p2p.send((ACT, 1, 0), 0, [torch.randn(2)])  # right key, wrong destination
