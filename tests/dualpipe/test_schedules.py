"""Schedules as data: each (stage, chunk) computed once, in its place, in a legal order; bad
arguments rejected; DualPipe(V) follows REFERENCE.md's eight-phase shape."""

from __future__ import annotations

import pytest

from dualpipe import (
    Action,
    dualpipe_schedule,
    dualpipev_schedule,
    one_f_one_b_schedule,
    simulate,
    validate_schedule,
    zb1p_schedule,
)
from dualpipe.schedules import Place, Schedule


@pytest.mark.parametrize("ranks,chunks", [(1, 2), (1, 5), (2, 4), (3, 7), (4, 8), (4, 13), (8, 16)])
def test_dualpipev_schedule_is_complete_and_runs(ranks: int, chunks: int) -> None:
    s = dualpipev_schedule(ranks, chunks)
    validate_schedule(s)
    simulate(s)  # raises on a deadlock
    assert s.num_stages == 2 * ranks and s.input_rank(0) == 0 and s.loss_rank(0) == 0
    for r in range(ranks):
        assert s.place(r, 0) == Place(r, 0) and s.place(2 * ranks - 1 - r, 0) == Place(r, 1)


@pytest.mark.parametrize("ranks,chunks", [(2, 4), (2, 6), (4, 8), (4, 10), (6, 12), (8, 16), (8, 22)])
def test_dualpipe_schedule_is_complete_and_runs(ranks: int, chunks: int) -> None:
    s = dualpipe_schedule(ranks, chunks)
    validate_schedule(s)
    simulate(s)
    assert s.input_rank(0) == 0 and s.loss_rank(0) == ranks - 1
    assert s.input_rank(1) == ranks - 1 and s.loss_rank(1) == 0
    assert len(s.chunks_of_direction(0)) == len(s.chunks_of_direction(1)) == chunks // 2


def test_dualpipev_rank_follows_the_eight_phases() -> None:
    """Rank r of N with C chunks, counted by hand from REFERENCE.md's phase list."""
    N, C = 4, 10
    s = dualpipev_schedule(N, C)
    for r in range(N):
        kinds = [a.kind for a in s.actions[r]]
        lead = kinds[: 2 * (N - r - 1)]
        assert lead == ["F"] * (2 * (N - r - 1))  # phase 1: F(stage r) only
        assert all(a.stage == r for a in s.actions[r][: 2 * (N - r - 1)])
        # F&B pairs: phase 4 has 2 per iteration (one fewer on the turning rank N-1), phase 5 one.
        pairs = kinds.count("FB")
        expect = 2 * (C - 2 * N + r + 1) + (N - r - 1) - (1 if r == N - 1 else 0)
        assert pairs == expect, (r, pairs, expect)
        # W count: phases 3, 7, 8 -> (N-r-1) + (N-r-1) + (r+1); the schedule ends with W x (r+1).
        assert kinds.count("W") == 2 * (N - r - 1) + r + 1
        assert kinds[-(r + 1) :] == ["W"] * (r + 1)


@pytest.mark.parametrize("fn", [one_f_one_b_schedule, zb1p_schedule])
@pytest.mark.parametrize("ranks,chunks", [(1, 1), (2, 1), (2, 3), (4, 4), (4, 9), (8, 3)])
def test_flat_schedules_are_complete_and_run(fn, ranks: int, chunks: int) -> None:
    s = fn(ranks, chunks)
    validate_schedule(s)
    simulate(s)


def test_one_f_one_b_order_by_hand() -> None:
    s = one_f_one_b_schedule(3, 4)
    assert [str(a) for a in s.actions[0]] == ["F0.0", "F0.1", "F0.2", "B0.0", "F0.3", "B0.1", "B0.2", "B0.3"]
    assert [str(a) for a in s.actions[2]] == ["F2.0", "B2.0", "F2.1", "B2.1", "F2.2", "B2.2", "F2.3", "B2.3"]


def test_zb1p_defers_w_by_rank() -> None:
    s = zb1p_schedule(3, 4)
    # rank 2 of 3 keeps 2 weight gradients waiting: each W runs two backwards after its B
    assert [str(a) for a in s.actions[2]] == ["F2.0", "Bi2.0", "F2.1", "Bi2.1", "F2.2", "Bi2.2", "W2.0",
                                              "F2.3", "Bi2.3", "W2.1", "W2.2", "W2.3"]
    assert [str(a) for a in s.actions[0]][:4] == ["F0.0", "F0.1", "F0.2", "Bi0.0"]
    assert str(s.actions[0][4]) == "W0.0"  # rank 0 runs each W right after its B


@pytest.mark.parametrize(
    "fn,args,match",
    [
        (dualpipe_schedule, (3, 6), "even num_ranks"),
        (dualpipe_schedule, (4, 9), "even num_chunks"),
        (dualpipe_schedule, (4, 6), "num_chunks >= 2 \\* num_ranks"),
        (dualpipev_schedule, (3, 5), "num_chunks >= 2 \\* num_ranks"),
        (dualpipev_schedule, (0, 5), "num_ranks must be >= 1"),
        (one_f_one_b_schedule, (2, 0), "num_chunks must be >= 1"),
    ],
)
def test_bad_arguments_raise_value_error(fn, args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_non_int_arguments_raise_type_error() -> None:
    with pytest.raises(TypeError, match="num_chunks must be an int"):
        dualpipev_schedule(2, 4.0)


def _flat(actions: list[list[str]], chunks: int) -> Schedule:
    def parse(t: str) -> Action:
        kind, split = t[0], t[1] == "i"
        st, c = t[1 + split :].split(".")
        return Action(kind, int(st), int(c), split=split)

    ranks = len(actions)
    return Schedule("hand", ranks, chunks, (tuple(Place(s, 0) for s in range(ranks)),), (0,) * chunks,
                    tuple(tuple(parse(t) for t in acts) for acts in actions))


@pytest.mark.parametrize(
    "actions,match",
    [
        ([["F0.0", "B0.0"], ["B1.0", "F1.0"]], "backward .* before its forward"),
        ([["F0.0", "F0.0", "B0.0"], ["F1.0", "B1.0"]], "appears twice"),
        ([["F0.0", "B0.0"], ["F1.0"]], "B of stage 1 chunk 0 is missing"),
        ([["F0.0", "B0.0", "F1.0"], ["F1.0", "B1.0"]], "lives on rank 1"),
        ([["F0.0", "Bi0.0"], ["F1.0", "B1.0"]], "never get their W"),
        ([["F0.0", "F0.1", "Bi0.0", "Bi0.1", "W0.1", "W0.0"], ["F1.0", "B1.0", "F1.1", "B1.1"]], "FIFO"),
    ],
)
def test_validate_rejects_broken_schedules(actions, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_schedule(_flat(actions, 2 if any(".1" in t for a in actions for t in a) else 1))
