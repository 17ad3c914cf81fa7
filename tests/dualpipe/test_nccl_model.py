"""NCCL-safety of the executor's P2P, without a GPU: record every rank's P2P groups from real runs
(gloo) and check them with the model of NCCL's semantics in ``nccl_model`` (no deadlock, every
message matched by per-pair order and size); and show the model rejects wrong orders, among them
the old executor's (a receive posted alone ahead of the rank's sends).

Runs cover DualPipe (2, 4, 6, 8 ranks), DualPipeV (1-4), 1F1B and ZB1P, several chunk counts,
and per case four steps: shapes learned (header
then payload), cached (one message per transfer), reshaped (a bigger batch: some transfers
RESHAPE, others stay cached) and inference. Gradients of the three training steps are checked
against the float64 sequential reference too. Without processes, the groups ``transfer_rounds``
plans (steady state, and a first step with its payload groups at their slots) pass the model for
many more rank and chunk counts, and payload slots the two sides disagree on are caught.
"""

from __future__ import annotations

import pytest
import torch

import ops
from dualpipe import ZB1P, DualPipe, DualPipeV, OneFOneB, sum_mirror_grads
from dualpipe.comm import ACT, GRAD, HEADER_BYTES, P2P, RoundPlan
from dualpipe.executor import step_actions, transfer_plan, transfer_rounds
from dualpipe.schedules import dualpipe_schedule, dualpipev_schedule, one_f_one_b_schedule, zb1p_schedule
from tests.dualpipe.nccl_model import Deadlock, Mismatch, check_groups
from tests.dualpipe.stages import DIM, HookStage, Stage, criterion, make_stages, reference
from tests.harness.distributed import run_distributed

TOL = 1e-10


# ------------------------------------------------------------------------------------ the model itself
def test_model_passes_a_grouped_exchange_and_a_chain() -> None:
    swap = [[[("send", 1, 8), ("recv", 1, 8)]], [[("recv", 0, 8), ("send", 0, 8)]]]
    assert check_groups(swap) >= 1
    chain = [[[("send", 1, 4)]], [[("recv", 0, 4)], [("send", 2, 4)]], [[("recv", 1, 4)]]]
    check_groups(chain)


def test_model_finds_a_lone_receive_ahead_of_a_send_deadlocks() -> None:
    # Each rank posts its receive, then its send: NCCL's per-rank stream never reaches the sends.
    ungrouped = [[[("recv", 1, 8)], [("send", 1, 8)]], [[("recv", 0, 8)], [("send", 0, 8)]]]
    with pytest.raises(Deadlock, match="rank 0 group 0"):
        check_groups(ungrouped)
    # Two lone sends to each other also wait for each other's receives.
    with pytest.raises(Deadlock):
        check_groups([[[("send", 1, 8)], [("recv", 1, 8)]], [[("send", 0, 8)], [("recv", 0, 8)]]])
    # A three-rank cycle of lone receives.
    ring = [[[("recv", (r - 1) % 3, 8)], [("send", (r + 1) % 3, 8)]] for r in range(3)]
    with pytest.raises(Deadlock):
        check_groups(ring)


def test_model_finds_mismatched_counts_sizes_and_order() -> None:
    with pytest.raises(Mismatch, match="1 sends"):
        check_groups([[[("send", 1, 8)]], [[("recv", 0, 8), ("recv", 0, 8)]]])
    with pytest.raises(Mismatch, match="16 bytes sent"):
        check_groups([[[("send", 1, 16)]], [[("recv", 0, 8)]]])
    # The same two messages, received in the other order: a size mismatch by position.
    with pytest.raises(Mismatch):
        check_groups([[[("send", 1, 16), ("send", 1, 8)]], [[("recv", 0, 8), ("recv", 0, 16)]]])


def _old_ungrouped_order(sched) -> list[list[list[tuple[str, int, int]]]]:
    """The executor before grouping: a receiver thread per peer posted its first receive at the
    step's start, alone, before the rank's first send; sends went out one by one."""
    out = []
    for r in range(sched.num_ranks):
        incoming, outgoing = transfer_plan(sched, r, True)
        groups = [[("recv", p, HEADER_BYTES)] for p in sorted(incoming)]
        groups += [[("send", dst, HEADER_BYTES)] for _, dst in outgoing]
        groups += [[("recv", p, HEADER_BYTES)] for p in sorted(incoming) for _ in incoming[p][1:]]
        out.append(groups)
    return out


@pytest.mark.parametrize("sched", [dualpipe_schedule(2, 4), dualpipe_schedule(4, 8), dualpipev_schedule(2, 4),
                                   dualpipev_schedule(3, 6), one_f_one_b_schedule(2, 4), zb1p_schedule(4, 6)],
                         ids=lambda s: f"{s.name}-{s.num_ranks}")
def test_model_rejects_the_old_ungrouped_order(sched) -> None:
    groups = _old_ungrouped_order(sched)
    with pytest.raises(Deadlock):
        check_groups(groups)


# ------------------------------------------------------------------------------------ recorded runs
def _pipe(kind: str, rank: int, world: int, stages: list) -> torch.nn.Module:
    n = len(stages)
    if kind in ("v", "vh", "d"):
        return (DualPipeV if kind != "d" else DualPipe)((stages[rank], stages[n - 1 - rank]))
    return (OneFOneB if kind == "1f1b" else ZB1P)(stages[rank])


def _step(kind: str, pipe, rank: int, world: int, chunks: int, batch: int, seed: int, training: bool):
    """One step; returns this step's (micro-batch inputs, labels) in the reference's terms."""
    g = torch.Generator().manual_seed(seed)
    x0, y0, x1, y1 = (torch.randn(batch, DIM, dtype=torch.float64, generator=g) for _ in range(4))
    kw = {"criterion": criterion} if training else {}
    with torch.set_grad_enabled(training):
        if kind == "d":
            if rank == 0:
                pipe.step(x0, num_chunks=chunks, labels=(y1,) if training else (), **kw)
            elif rank == world - 1:
                pipe.step(x1, num_chunks=chunks, labels=(y0,) if training else (), **kw)
            else:
                pipe.step(num_chunks=chunks)
            h = chunks // 2
            return list(torch.tensor_split(x0, h)) + list(torch.tensor_split(x1, h)), \
                list(torch.tensor_split(y0, h)) + list(torch.tensor_split(y1, h))
        first = rank == 0
        last = rank == (0 if kind in ("v", "vh") else world - 1)
        args = (x0,) if first else ()
        kws = dict(kw, labels=(y0,)) if (last and training) else {}
        pipe.step(*args, num_chunks=chunks, **kws)
        return list(torch.tensor_split(x0, chunks)), list(torch.tensor_split(y0, chunks))


def record_worker(rank: int, world: int, cases: list[tuple[str, int, int]], seed: int):
    """cases: (kind, num_chunks, batch). For each case: four steps (learn, cached, reshaped,
    inference); returns per case this rank's groups per step and the worst gradient diff
    against the sequential reference."""
    out = []
    for i, (kind, chunks, batch) in enumerate(cases):
        n = 2 * world if kind in ("v", "vh") else world
        stages = make_stages(seed + i, n, HookStage if kind == "vh" else Stage)
        pipe = _pipe(kind, rank, world, stages)
        pipe.record_p2p = True
        steps, xs, ys = [], [], []
        for s, (b, training) in enumerate([(batch, True), (batch, True), (batch + 1, True), (batch, False)]):
            mx, my = _step(kind, pipe, rank, world, chunks, b, seed + 31 * i + s, training)
            if training:
                xs, ys = xs + mx, ys + my
            steps.append(pipe.p2p_groups)
        if kind == "d":
            sum_mirror_grads(pipe)
        _, ref = reference(stages, xs, ys)
        held = [rank, n - 1 - rank] if kind in ("v", "vh", "d") else [rank]
        diffs = [ops.calc_diff(p.grad, gr) for st in dict.fromkeys(held)
                 for p, gr in zip(stages[st].parameters(), ref[st], strict=True)]
        out.append((steps, max(diffs)))
    return out


WORLD_CASES = {  # kept small for CI: test_transfer_rounds_* covers more rank and chunk counts, without processes
    1: [("v", 3, 7)],
    2: [("d", 6, 7), ("vh", 5, 11), ("1f1b", 4, 6)],
    3: [("v", 7, 13), ("zb1p", 6, 8)],
    4: [("d", 8, 9), ("v", 8, 11), ("zb1p", 8, 9)],
    6: [("d", 12, 13)],
    8: [("d", 16, 16)],
}


@pytest.mark.parametrize("world", [1, 2, 3, 4, pytest.param(6, marks=pytest.mark.slow), 8])
def test_recorded_p2p_groups_pass_the_nccl_model(world: int) -> None:
    cases = WORLD_CASES[world]
    res = run_distributed(record_worker, world, cases, int(torch.randint(0, 2**30, ()).item()), timeout=300)
    for idx, (kind, chunks, _) in enumerate(cases):
        for s in range(4):
            groups = [res[r][idx][0][s] for r in range(world)]
            assert all(groups[r] for r in range(world)) or world == 1, (kind, chunks, s)
            try:
                check_groups(groups)
            except AssertionError as e:
                raise AssertionError(f"{kind} {world} ranks, {chunks} chunks, step {s}: {e}") from e
        worst = max(res[r][idx][1] for r in range(world))
        assert worst < TOL, (kind, chunks, worst)
    # Every protocol path was exercised: header-then-payload (first step), one message (second).
    if world > 1:
        first = {n for g in res[0][0][0][0] for _, _, n in g}
        second = {n for g in res[0][0][0][1] for _, _, n in g}
        assert HEADER_BYTES in first and HEADER_BYTES not in second, (first, second)


# ------------------------------------------------------------------------------------ the plan, without processes
PLAN_SCHEDULES = [(dualpipe_schedule, w, c) for w in (2, 4, 6, 8) for c in (2 * w, 2 * w + 2, 4 * w)] + \
    [(dualpipev_schedule, w, c) for w in (1, 2, 3, 4, 8) for c in (2 * w, 2 * w + 1, 4 * w + 3)] + \
    [(f, w, c) for f in (one_f_one_b_schedule, zb1p_schedule) for w in (2, 3, 4, 8) for c in (w, 2 * w + 1)]


def _size(key: tuple[int, int, int]) -> int:
    """A size distinct per transfer (stages < 32), so a pair's messages in the wrong order mismatch."""
    kind, st, c = key
    return 1 + kind + 2 * st + 64 * c


def _planned_groups(sched, training: bool, first_step: bool, old_receiver_slots: bool = False):
    """Every rank's groups in P2P's posting order, from the plan alone: rounds and payload groups
    merged by clock time (a round before the payload group of its time). Steady state: one
    message per transfer, no payload groups; first step: a header per transfer, its payload in
    its slot's group. ``old_receiver_slots``: receivers put a payload in its first message's
    round time instead (the previous protocol), senders do not: the model must catch that."""
    out = []
    for r in range(sched.num_ranks):
        incoming, outgoing = transfer_plan(sched, r, training)
        plan = transfer_rounds(sched, r, training)
        first = (lambda k: HEADER_BYTES) if first_step else _size
        seq = [((t, 0), [("send", d, first(k)) for k, d in sends] + [("recv", s, first(k)) for k, s in recvs])
               for t, (sends, recvs) in zip(plan.times, plan.rounds, strict=True)]
        if first_step:
            if old_receiver_slots:
                time_of = {k: t for t, (_, recvs) in zip(plan.times, plan.rounds, strict=True) for k, _ in recvs}
                plan = RoundPlan(plan.rounds, plan.times, plan.post_before, {**plan.slots, **time_of})
            p2p = P2P(None, list(range(sched.num_ranks)), torch.device("cpu"), sched.num_chunks, incoming, outgoing,
                      plan)
            seq += [((t, 1), [("send", d, _size(k)) for k, d in sends] + [("recv", s, _size(k)) for k, s in recvs])
                    for t, sends, recvs in p2p.payload_slots]
        out.append([ops for _, ops in sorted(seq, key=lambda e: e[0]) if ops])
    return out


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fn,ranks,chunks", PLAN_SCHEDULES)
def test_transfer_rounds_pass_the_model_and_post_inputs_in_time(fn, ranks: int, chunks: int, training: bool) -> None:
    """Groups straight from ``transfer_rounds`` (steady state, and a first step with header and
    payload messages), for more rank and chunk counts than the recorded runs; each action's
    inputs are posted before it, and no payload group posted before an action reads the header
    of a transfer that a later action consumes (so a rank never waits for a header early)."""
    sched = fn(ranks, chunks)
    for r in range(ranks):
        plan = transfer_rounds(sched, r, training)
        rounds, post_before = plan.rounds, plan.post_before
        assert post_before == sorted(post_before) and post_before[-1] <= len(rounds)
        assert plan.times == sorted(set(plan.times))
        round_of = {k: i for i, (_, recvs) in enumerate(rounds) for k, _ in recvs}
        consumer = {}
        incoming, _ = transfer_plan(sched, r, training)
        remote = {k for keys in incoming.values() for k in keys}
        for i, (a, n) in enumerate(zip(step_actions(sched, r, training), post_before, strict=True)):
            keys = {"F": [(ACT, a.stage, a.chunk)], "B": [(GRAD, a.stage, a.chunk)], "W": [],
                    "FB": [(ACT, a.stage, a.chunk), (GRAD, *(a.bwd or (0, 0)))]}[a.kind]
            assert all(round_of[k] < n for k in keys if k in remote), (r, str(a))
            consumer.update((k, i) for k in keys if k in remote)
        for k in remote:  # a payload slot lies between the transfer's round and its consumer
            assert plan.times[round_of[k]] <= plan.slots[k] <= plan.times[post_before[consumer[k]] - 1], (r, k)
        for i, n in enumerate(post_before):  # P2P.post(n) posts payload groups of slots before round n-1's time
            early = [k for k in remote if n > 0 and plan.slots[k] < plan.times[n - 1]]
            assert all(consumer[k] < i for k in early), (r, i)
    check_groups(_planned_groups(sched, training, first_step=False))
    check_groups(_planned_groups(sched, training, first_step=True))


@pytest.mark.parametrize("fn,ranks,chunks", [(dualpipev_schedule, 4, 8), (dualpipe_schedule, 4, 8),
                                             (zb1p_schedule, 4, 9)])
def test_model_rejects_payload_slots_the_two_sides_disagree_on(fn, ranks: int, chunks: int) -> None:
    with pytest.raises((Deadlock, Mismatch)):
        check_groups(_planned_groups(fn(ranks, chunks), True, first_step=True, old_receiver_slots=True))
