"""Pipeline schedules as pure functions: (ranks, chunks) -> per-rank lists of actions.

A schedule says, for every rank, the order in which it runs forward (F), backward (B), weight
gradient (W) and overlapped forward&backward (FB) steps over (stage, chunk) pairs. It holds no
tensors and touches no process group, so the simulator, the executor, the tests and the timeline
pictures all read the same plain data.

Vocabulary (the names of DeepSeek's DualPipe and the zero-bubble paper):

- a *chunk* is a micro-batch; chunk ids are global, ``0 .. num_chunks-1``;
- a *stage* is a position along a chunk's route through the model (stage 0 takes the input, the
  last stage computes the loss);
- a *direction* is one route of stages over (rank, slot) places; DualPipe has two (one from each
  end of the pipeline), the others one; ``slot`` indexes the rank's stage modules
  (``modules[slot]``);
- ``B`` is the full backward, or with ``split=True`` only the input gradient, whose weight
  gradient is deferred to a later ``W`` of the same (stage, chunk) on the same rank. Weight
  gradients are queued FIFO (``WeightGradStore``), so a rank's W actions come in the order of its
  split B actions; ``validate_schedule`` checks that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

KINDS = ("F", "B", "W", "FB")


class Action(NamedTuple):
    """One step of a rank's schedule.

    ``kind``: "F", "B", "W" or "FB". ``stage``/``chunk``: what it computes (for FB: the forward
    half). ``split``: a B that computes only the input gradient (its W comes later).
    ``bwd``: for FB, the (stage, chunk) of the backward half (never split).
    """

    kind: str
    stage: int
    chunk: int
    split: bool = False
    bwd: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.kind == "FB":
            assert self.bwd is not None
            return f"F{self.stage}.{self.chunk}&B{self.bwd[0]}.{self.bwd[1]}"
        suffix = "i" if self.split else ""
        return f"{self.kind}{suffix}{self.stage}.{self.chunk}"


class Place(NamedTuple):
    """Where a stage lives: ``rank`` in the pipeline group and ``slot`` in that rank's modules."""

    rank: int
    slot: int


@dataclass(frozen=True)
class Schedule:
    """A complete schedule: placement of every stage and every rank's ordered actions.

    ``routes[d][s]`` is the place of stage ``s`` on direction ``d``; ``directions[c]`` is the
    direction of chunk ``c``; ``actions[r]`` is rank ``r``'s action list.
    """

    name: str
    num_ranks: int
    num_chunks: int
    routes: tuple[tuple[Place, ...], ...]
    directions: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.routes[0])

    def place(self, stage: int, chunk: int) -> Place:
        return self.routes[self.directions[chunk]][stage]

    def is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1

    def chunks_of_direction(self, direction: int) -> list[int]:
        return [c for c, d in enumerate(self.directions) if d == direction]

    def input_rank(self, direction: int) -> int:
        """The rank that feeds inputs to ``direction`` (its stage 0)."""
        return self.routes[direction][0].rank

    def loss_rank(self, direction: int) -> int:
        """The rank that computes the loss (and needs criterion and labels) for ``direction``."""
        return self.routes[direction][-1].rank


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# DualPipe and DualPipeV: one shared eight-phase shape (DeepSeek's DualPipe, REFERENCE.md).
# ----------------------------------------------------------------------------------------------


def _dual_phases(half_ranks: int, half_rank: int, chunks: int) -> list[tuple[str, int, int, bool]]:
    """The eight phases of one DualPipe(V) rank, as (kind, phase_f, phase_b, split) tuples.

    ``half_ranks`` (H) ranks per direction, this rank's distance ``half_rank`` (h) from the end
    where phase-0 data enters, ``chunks`` (C) per phase. For FB items ``phase_f`` is the forward's
    phase and ``phase_b`` the backward's; for F/B/W only the matching field is used. The counts
    are DeepSeek's, each next to its loop.
    """
    H, h, C = half_ranks, half_rank, chunks
    out: list[tuple[str, int, int, bool]] = []
    # 1: F0 x 2(H-h-1): fill this rank's phase-0 activations.
    for _ in range((H - h - 1) * 2):
        out.append(("F", 0, -1, False))
    # 2: F0 F1 x (h+1).
    for _ in range(h + 1):
        out += [("F", 0, -1, False), ("F", 1, -1, False)]
    # 3: B1 (zero bubble) W F1 x (H-h-1).
    for _ in range(H - h - 1):
        out += [("B", -1, 1, True), ("W", -1, -1, False), ("F", 1, -1, False)]
    # 4: main loop [F0 & B1] [F1 & B0] x (C - 2H + h + 1). On the rank where the phases turn
    # (h = H-1) the first pair runs unoverlapped: its F0 feeds the F1 that the B1 is waiting on.
    for i in range(C - 2 * H + h + 1):
        if i == 0 and h == H - 1:
            out += [("F", 0, -1, False), ("B", -1, 1, False)]
        else:
            out.append(("FB", 0, 1, False))
        out.append(("FB", 1, 0, False))
    # 5: B1 [F1 & B0] x (H-h-1).
    for _ in range(H - h - 1):
        out += [("B", -1, 1, False), ("FB", 1, 0, False)]
    # 6: B1 B0 x (h+1); the second half uses the zero-bubble split.
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        out.append(("B", -1, 1, split))
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        out.append(("B", -1, 0, split))
    # 7: W B0 (zero bubble) x (H-h-1).
    for _ in range(H - h - 1):
        out += [("W", -1, -1, False), ("B", -1, 0, True)]
    # 8: W x (h+1).
    for _ in range(h + 1):
        out.append(("W", -1, -1, False))
    return out


def _phases_to_actions(
    phases: list[tuple[str, int, int, bool]], stage_of_phase: tuple[int, int], chunks_of_phase: tuple[list[int], list[int]]
) -> list[Action]:
    """Numbers the phase items: each phase's forwards and backwards take its chunks in order."""
    next_f, next_b = [0, 0], [0, 0]
    pending_w: list[tuple[int, int]] = []
    actions: list[Action] = []

    def take(counter: list[int], phase: int) -> tuple[int, int]:
        chunk = chunks_of_phase[phase][counter[phase]]
        counter[phase] += 1
        return stage_of_phase[phase], chunk

    for kind, pf, pb, split in phases:
        if kind == "F":
            s, c = take(next_f, pf)
            actions.append(Action("F", s, c))
        elif kind == "B":
            s, c = take(next_b, pb)
            actions.append(Action("B", s, c, split=split))
            if split:
                pending_w.append((s, c))
        elif kind == "W":
            s, c = pending_w.pop(0)
            actions.append(Action("W", s, c))
        else:
            fs, fc = take(next_f, pf)
            actions.append(Action("FB", fs, fc, bwd=take(next_b, pb)))
    return actions


def dualpipev_schedule(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): rank r holds stages r (slot 0) and 2N-1-r (slot 1).

    Every chunk enters on rank 0, runs stages 0..N-1 down the ranks, turns on rank N-1 and comes
    back through stages N..2N-1; the loss is computed on rank 0. Needs ``num_chunks >= 2 *
    num_ranks``.
    """
    N = _check_int("num_ranks", num_ranks, 1)
    C = _check_int("num_chunks", num_chunks, 1)
    if C < 2 * N:
        raise ValueError(f"DualPipeV needs num_chunks >= 2 * num_ranks = {2 * N}, got num_chunks={C}")
    route = tuple(Place(s, 0) for s in range(N)) + tuple(Place(2 * N - 1 - s, 1) for s in range(N, 2 * N))
    chunks = list(range(C))
    actions = tuple(
        tuple(_phases_to_actions(_dual_phases(N, r, C), (r, 2 * N - 1 - r), (chunks, chunks))) for r in range(N)
    )
    return Schedule("DualPipeV", N, C, (route,), (0,) * C, actions)


def dualpipe_schedule(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe: two directions over PP = num_ranks stages, half of the chunks each.

    Rank r holds stage r of direction 0 (slot 0, data enters on rank 0, loss on rank PP-1) and
    stage PP-1-r of direction 1 (slot 1, data enters on rank PP-1, loss on rank 0): rank r and
    its mirror PP-1-r hold the same stages. Chunks 0..C/2-1 go in direction 0, the rest in
    direction 1. Needs an even rank count, an even ``num_chunks`` and ``num_chunks >= 2 *
    num_ranks``.
    """
    N = _check_int("num_ranks", num_ranks, 2)
    C = _check_int("num_chunks", num_chunks, 2)
    if N % 2:
        raise ValueError(f"DualPipe needs an even num_ranks (rank r mirrors rank num_ranks-1-r), got {N}")
    if C % 2:
        raise ValueError(f"DualPipe needs an even num_chunks (half enter from each end), got {C}")
    if C < 2 * N:
        raise ValueError(f"DualPipe needs num_chunks >= 2 * num_ranks = {2 * N}, got num_chunks={C}")
    H, half = N // 2, C // 2
    routes = (tuple(Place(s, 0) for s in range(N)), tuple(Place(N - 1 - s, 1) for s in range(N)))
    dir_chunks = (list(range(half)), list(range(half, C)))
    actions = []
    for r in range(N):
        second_half = r >= H
        h = min(r, N - 1 - r)
        # Schedule phase p runs slot p ^ second_half: each rank starts with the direction whose
        # data enters at its own end of the pipeline.
        slots = (int(second_half), 1 - int(second_half))
        stage_of_slot = (r, N - 1 - r)
        actions.append(
            tuple(
                _phases_to_actions(
                    _dual_phases(H, h, half),
                    (stage_of_slot[slots[0]], stage_of_slot[slots[1]]),
                    (dir_chunks[slots[0]], dir_chunks[slots[1]]),
                )
            )
        )
    return Schedule("DualPipe", N, C, routes, (0,) * half + (1,) * half, tuple(actions))


# ----------------------------------------------------------------------------------------------
# 1F1B and ZB1P (ZB-H1): one stage per rank, one direction.
# ----------------------------------------------------------------------------------------------


def one_f_one_b_schedule(num_ranks: int, num_chunks: int) -> Schedule:
    """1F1B: rank r warms up with min(P-1-r, C) forwards, alternates F and B, then drains."""
    P = _check_int("num_ranks", num_ranks, 1)
    C = _check_int("num_chunks", num_chunks, 1)
    actions = []
    for r in range(P):
        warmup = min(P - 1 - r, C)
        acts = [Action("F", r, c) for c in range(warmup)]
        for i in range(C - warmup):  # steady: F then B
            acts += [Action("F", r, warmup + i), Action("B", r, i)]
        acts += [Action("B", r, c) for c in range(C - warmup, C)]  # cooldown
        actions.append(tuple(acts))
    route = tuple(Place(s, 0) for s in range(P))
    return Schedule("1F1B", P, C, (route,), (0,) * C, tuple(actions))


def zb1p_schedule(num_ranks: int, num_chunks: int) -> Schedule:
    """ZB1P (ZB-H1 of the zero-bubble paper): 1F1B's order of F and B, every B split into B and W.

    Rank r runs each W ``r`` backwards after its B (the last ranks defer the most): they have
    the shortest 1F1B warm-up, so they can hold r more chunks and still stay within rank 0's
    peak of P live chunks, and the deferred W's are what they compute while the rest of the
    pipeline drains. That takes the bubble from (P-1)(F+B) to (P-1)(F+B-2W) at F = W = B/2.
    """
    P = _check_int("num_ranks", num_ranks, 1)
    C = _check_int("num_chunks", num_chunks, 1)
    actions = []
    for r in range(P):
        warmup = min(P - 1 - r, C)
        lag = r  # how many split backwards wait for their W
        acts = [Action("F", r, c) for c in range(warmup)]
        pending: list[int] = []
        # steady: F then B; cooldown: B only. Each B's W runs `lag` backwards later.
        steps = [(warmup + i, i) for i in range(C - warmup)] + [(None, c) for c in range(C - warmup, C)]
        for f_chunk, b_chunk in steps:
            if f_chunk is not None:
                acts.append(Action("F", r, f_chunk))
            acts.append(Action("B", r, b_chunk, split=True))
            pending.append(b_chunk)
            if len(pending) > lag:
                acts.append(Action("W", r, pending.pop(0)))
        acts += [Action("W", r, c) for c in pending]
        actions.append(tuple(acts))
    route = tuple(Place(s, 0) for s in range(P))
    return Schedule("ZB1P", P, C, (route,), (0,) * C, tuple(actions))


SCHEDULES = {
    "dualpipe": dualpipe_schedule,
    "dualpipev": dualpipev_schedule,
    "1f1b": one_f_one_b_schedule,
    "zb1p": zb1p_schedule,
}


# ----------------------------------------------------------------------------------------------
# Validation: every (stage, chunk) computed exactly once, in the right place, in a legal order.
# ----------------------------------------------------------------------------------------------


def validate_schedule(schedule: Schedule) -> None:
    """Raises ValueError naming the first broken rule. Cross-rank deadlocks are found by
    ``simulate`` (a rank-local check cannot see them)."""
    S, C, N = schedule.num_stages, schedule.num_chunks, schedule.num_ranks
    if len(schedule.actions) != N:
        raise ValueError(f"schedule {schedule.name}: {len(schedule.actions)} action lists for {N} ranks")
    if len(schedule.directions) != C:
        raise ValueError(f"schedule {schedule.name}: directions has {len(schedule.directions)} entries for {C} chunks")
    seen: dict[tuple[str, int, int], int] = {}
    for r, acts in enumerate(schedule.actions):
        done_f: set[tuple[int, int]] = set()
        done_b: set[tuple[int, int]] = set()
        split_fifo: list[tuple[int, int]] = []
        for a in acts:
            if a.kind not in KINDS:
                raise ValueError(f"rank {r}: unknown action kind {a.kind!r}")
            parts = [("F", a.stage, a.chunk, False)] if a.kind != "FB" else [("F", a.stage, a.chunk, False), ("B", *a.bwd, False)]
            if a.kind in ("B", "W"):
                parts = [(a.kind, a.stage, a.chunk, a.split)]
            for kind, s, c, split in parts:
                if not (0 <= s < S and 0 <= c < C):
                    raise ValueError(f"rank {r}: action {a} names stage {s} / chunk {c} outside {S} stages, {C} chunks")
                if schedule.place(s, c).rank != r:
                    raise ValueError(f"rank {r}: action {a} runs stage {s} of chunk {c}, which lives on rank {schedule.place(s, c).rank}")
                key = (kind, s, c)
                if key in seen:
                    raise ValueError(f"rank {r}: {kind} of stage {s} chunk {c} appears twice")
                seen[key] = r
                if kind == "B":
                    if (s, c) not in done_f:
                        raise ValueError(f"rank {r}: backward {a} before its forward")
                    done_b.add((s, c))
                    if split:
                        split_fifo.append((s, c))
                elif kind == "W":
                    if not split_fifo or split_fifo[0] != (s, c):
                        raise ValueError(f"rank {r}: {a} out of FIFO order of split backwards (next is {split_fifo[:1]})")
                    split_fifo.pop(0)
                else:
                    done_f.add((s, c))
        if split_fifo:
            raise ValueError(f"rank {r}: split backwards {split_fifo} never get their W")
    for s in range(S):
        for c in range(C):
            for kind in ("F", "B"):
                if (kind, s, c) not in seen:
                    raise ValueError(f"schedule {schedule.name}: {kind} of stage {s} chunk {c} is missing")
