"""Event simulation of a schedule: when each action runs, the bubbles, the live activations.

Each rank runs its actions in order; an action starts when the rank is free and its inputs have
arrived (a forward needs the previous stage's forward, a backward the next stage's backward, plus
``comm`` when they come from another rank). A schedule whose ranks wait on each other in a circle
is rejected with the stuck actions named, which is how dependency errors are found.

Costs follow the zero-bubble convention of DeepSeek's table: ``B`` is the FULL backward, ``W`` the
weight-gradient part, so a split B costs ``B - W``; ``FB`` is an overlapped F&B pair (default
``F + B``: no overlap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dualpipe.schedules import Action, Schedule, validate_schedule


@dataclass(frozen=True)
class Costs:
    """Durations of F, full B, W and an F&B pair (``FB``; None means F + B) and P2P latency."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "comm"):
            if getattr(self, name) < 0:
                raise ValueError(f"Costs.{name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"Costs.W ({self.W}) is part of the full backward B ({self.B}); it cannot exceed it")

    def of(self, action: Action) -> float:
        if action.kind == "F":
            return self.F
        if action.kind == "B":
            return self.B - self.W if action.split else self.B
        if action.kind == "W":
            return self.W
        return self.F + self.B if self.FB is None else self.FB


@dataclass(frozen=True)
class TimelineEvent:
    """One action of one rank on a timeline (simulated units or measured seconds)."""

    rank: int
    label: str
    kind: str
    start: float
    end: float


@dataclass
class SimResult:
    """Per-rank timelines and the summary numbers.

    ``bubble[r]`` = makespan - busy time of rank r; ``max_bubble`` (the largest) is the number
    REFERENCE.md's table gives; ``peak_activations[r]``
    counts (stage, chunk) activations held at once (from the start of F to the end of the full B,
    or of W after a split B).
    """

    timelines: list[list[TimelineEvent]]
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def max_activations(self) -> int:
        return max(self.peak_activations)


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimResult:
    """Runs ``schedule`` on an ideal machine with ``costs``; raises ValueError on deadlock."""
    validate_schedule(schedule)
    costs = costs or Costs()
    N = schedule.num_ranks
    f_done: dict[tuple[int, int], tuple[float, int]] = {}  # (stage, chunk) -> (time, rank)
    b_done: dict[tuple[int, int], tuple[float, int]] = {}
    pos = [0] * N
    clock = [0.0] * N
    timelines: list[list[TimelineEvent]] = [[] for _ in range(N)]
    last = schedule.num_stages - 1

    def arrival(done: dict, key: tuple[int, int], rank: int) -> float | None:
        if key not in done:
            return None
        t, src = done[key]
        return t + (costs.comm if src != rank else 0.0)

    def ready(a: Action, rank: int) -> float | None:
        """Time all inputs of ``a`` are available on ``rank``, or None if not computed yet."""
        times = [0.0]
        halves = []
        if a.kind in ("F", "FB"):
            halves.append(("F", a.stage, a.chunk))
        if a.kind == "B":
            halves.append(("B", a.stage, a.chunk))
        if a.kind == "FB":
            halves.append(("B", *a.bwd))
        for kind, s, c in halves:
            if kind == "F":
                if s > 0:
                    t = arrival(f_done, (s - 1, c), rank)
                    if t is None:
                        return None
                    times.append(t)
            else:
                t = f_done.get((s, c))
                if t is None:
                    return None
                times.append(t[0])
                if s < last:
                    t = arrival(b_done, (s + 1, c), rank)
                    if t is None:
                        return None
                    times.append(t)
        return max(times)

    remaining = sum(len(a) for a in schedule.actions)
    while remaining:
        progressed = False
        for r in range(N):
            while pos[r] < len(schedule.actions[r]):
                a = schedule.actions[r][pos[r]]
                t = ready(a, r) if a.kind != "W" else 0.0
                if t is None:
                    break
                start = max(clock[r], t)
                end = start + costs.of(a)
                clock[r] = end
                timelines[r].append(TimelineEvent(r, str(a), a.kind, start, end))
                if a.kind in ("F", "FB"):
                    f_done[(a.stage, a.chunk)] = (end, r)
                if a.kind == "B":
                    b_done[(a.stage, a.chunk)] = (end, r)
                if a.kind == "FB":
                    b_done[a.bwd] = (end, r)
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(schedule.actions[r][pos[r]]) for r in range(N) if pos[r] < len(schedule.actions[r])}
            raise ValueError(f"schedule {schedule.name} deadlocks: ranks wait on each other at {stuck}")
    makespan = max((ev[-1].end for ev in timelines if ev), default=0.0)
    busy = [sum(e.end - e.start for e in ev) for ev in timelines]
    return SimResult(
        timelines=timelines,
        makespan=makespan,
        busy=busy,
        bubble=[makespan - b for b in busy],
        peak_activations=[_peak_live(schedule.actions[r]) for r in range(N)],
    )


def _peak_live(actions: tuple[Action, ...]) -> int:
    """Most (stage, chunk) activations alive at once on a rank, in action order."""
    live = peak = 0
    for a in actions:
        if a.kind in ("F", "FB"):
            live += 1
            peak = max(peak, live)
        if (a.kind == "B" and not a.split) or a.kind == "W" or a.kind == "FB":
            live -= 1
    return peak
