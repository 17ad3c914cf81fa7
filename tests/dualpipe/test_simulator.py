"""The simulator against REFERENCE.md's bubble/memory table and against timelines worked by hand."""

from __future__ import annotations

import pytest

from dualpipe import Costs, dualpipe_schedule, dualpipev_schedule, one_f_one_b_schedule, simulate, zb1p_schedule
from tests.dualpipe.test_schedules import _flat


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
@pytest.mark.parametrize("extra_chunks", [0, 3])
def test_bubbles_match_the_table_when_f_equals_w_equals_half_b(pp: int, extra_chunks: int) -> None:
    F, FB = 1.5, 3.7  # F = W = B/2; F&B an arbitrary overlapped cost
    c = Costs(F=F, B=2 * F, W=F, FB=FB)
    B, W = 2 * F, F
    chunks = 2 * pp + 2 * extra_chunks
    cases = {
        "1F1B": (one_f_one_b_schedule(pp, chunks), (pp - 1) * (F + B), pp),
        "ZB1P": (zb1p_schedule(pp, chunks), (pp - 1) * (F + B - 2 * W), pp),
        "DualPipe": (dualpipe_schedule(pp, chunks), (pp / 2 - 1) * (FB + B - 3 * W), pp + 1),
        "DualPipeV": (dualpipev_schedule(pp // 2, chunks), (pp / 2 - 1) * (FB + B - 3 * W), pp + 1),
    }
    for name, (sched, bubble, activations) in cases.items():
        r = simulate(sched, c)
        assert r.max_bubble == pytest.approx(bubble, abs=1e-9), (name, r.bubble)
        assert r.max_activations == activations, (name, r.peak_activations)


def test_one_f_one_b_by_hand_with_comm_latency() -> None:
    r = simulate(one_f_one_b_schedule(2, 2), Costs(F=1, B=3, W=1, comm=0.5))
    t = [[(e.label, e.start, e.end) for e in ev] for ev in r.timelines]
    assert t[0] == [("F0.0", 0, 1), ("F0.1", 1, 2), ("B0.0", 6, 9), ("B0.1", 10, 13)]
    assert t[1] == [("F1.0", 1.5, 2.5), ("B1.0", 2.5, 5.5), ("F1.1", 5.5, 6.5), ("B1.1", 6.5, 9.5)]
    assert r.makespan == 13 and r.bubble == [5, 5]


def test_zb1p_by_hand_with_b_three_times_f() -> None:
    r = simulate(zb1p_schedule(2, 2), Costs(F=1, B=3, W=1))
    t = [[(e.label, e.start, e.end) for e in ev] for ev in r.timelines]
    assert t[0] == [("F0.0", 0, 1), ("F0.1", 1, 2), ("Bi0.0", 4, 6), ("W0.0", 6, 7), ("Bi0.1", 7, 9), ("W0.1", 9, 10)]
    assert t[1] == [("F1.0", 1, 2), ("Bi1.0", 2, 4), ("F1.1", 4, 5), ("Bi1.1", 5, 7), ("W1.0", 7, 8), ("W1.1", 8, 9)]
    assert r.makespan == 10 and r.bubble == [2, 2] and r.peak_activations == [2, 2]


def test_dualpipev_single_rank_by_hand() -> None:
    r = simulate(dualpipev_schedule(1, 2), Costs(F=1, B=3, W=1, FB=3.5))
    labels = [e.label for e in r.timelines[0]]
    assert labels == ["F0.0", "F1.0", "F0.1", "B1.0", "F1.1&B0.0", "B1.1", "Bi0.1", "W0.1"]
    assert r.makespan == 1 + 1 + 1 + 3 + 3.5 + 3 + 2 + 1 and r.bubble == [0]
    assert r.peak_activations == [3]


def test_other_cost_ratio_differs_from_table() -> None:
    """REFERENCE.md: with F = B = 2W the table's DualPipe number does not hold; the simulator
    says what does. Here: 4 ranks, F = B = 2, W = 1, no overlap (F&B = F+B)."""
    c = Costs(F=2, B=2, W=1)
    r = simulate(dualpipe_schedule(4, 8), c)
    table = (4 / 2 - 1) * (4 + 2 - 3 * 1)
    assert r.max_bubble != pytest.approx(table)


def test_dualpipe_two_ranks_by_hand() -> None:
    """2 ranks, 4 chunks, F = B = 2, W = 1, no overlap: every start/end worked out on paper."""
    r = simulate(dualpipe_schedule(2, 4), Costs(F=2, B=2, W=1))
    t = [[(e.label, e.start, e.end) for e in ev] for ev in r.timelines]
    assert t[0] == [("F0.0", 0, 2), ("F1.2", 2, 4), ("F0.1", 4, 6), ("B1.2", 6, 8), ("F1.3&B0.0", 8, 12),
                    ("B1.3", 12, 14), ("Bi0.1", 14, 15), ("W0.1", 15, 16)]
    assert t[1] == [("F0.2", 0, 2), ("F1.0", 2, 4), ("F0.3", 4, 6), ("B1.0", 6, 8), ("F1.1&B0.2", 8, 12),
                    ("B1.1", 12, 14), ("Bi0.3", 14, 15), ("W0.3", 15, 16)]
    assert r.bubble == [0, 0]


def test_deadlocked_schedule_is_rejected() -> None:
    # rank 1 starts with chunk 1, whose input rank 0 only sends after chunk 0's backward.
    sched = _flat([["F0.0", "B0.0", "F0.1", "B0.1"], ["F1.1", "B1.1", "F1.0", "B1.0"]], 2)
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(sched)


def test_costs_reject_w_larger_than_b() -> None:
    with pytest.raises(ValueError, match="cannot exceed"):
        Costs(F=1, B=1, W=2)
