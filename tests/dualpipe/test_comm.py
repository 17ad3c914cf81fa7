"""The order-matched P2P plan (NCCL's matching rule) and its self-checks, without processes.

The multi-process tests (test_pipelines.py, test_errors.py) run every message on tag 0, so gloo
matches by posting order exactly like NCCL; these pin down the plan they rely on.
"""

from __future__ import annotations

import pytest
import torch

from dualpipe import dualpipe_schedule, dualpipev_schedule, one_f_one_b_schedule, zb1p_schedule
from dualpipe.comm import (
    ACT,
    GRAD,
    HEADER_BYTES,
    P2P,
    PeerAbort,
    RoundPlan,
    combined_size,
    decode_header,
    encode_header,
    metas_of,
)
from dualpipe.executor import step_actions, transfer_plan, transfer_rounds

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


def _one_send_p2p(cached: list | None = None) -> tuple[P2P, tuple[int, int, int]]:
    """Pipeline rank 0 of 2 (2 chunks) owing one transfer to rank 1; ``cached``: the shapes a
    previous step sent it with (both sides know them: the transfer is then one message)."""
    key = (ACT, 1, 0)
    plan = [(key, 1)]
    cache = {(2, *key): cached} if cached is not None else None
    return P2P(None, [0, 1], torch.device("cpu"), 2, {}, plan, RoundPlan([(plan, [])], [1.0], [], {key: 1.0}),
               cache=cache), key


@pytest.mark.parametrize("what", ["dtype", "count", "dims"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_send_refused_for_what_cannot_travel_is_still_owed_as_an_abort(what: str, cached: bool) -> None:
    """A stage output that no header can describe raises; the transfer is then not counted as
    sent, so the abort that follows the error takes its place (else the receiver would wait for it
    forever and the failing rank's next round would find it missing)."""
    tensors, error, match = {
        "dtype": ([torch.randn(3, dtype=torch.complex128)], TypeError, "dtype torch.complex128"),
        "count": ([torch.randn(2) for _ in range(16)], ValueError, "at most 15 tensors"),
        "dims": ([torch.randn([1] * 9) for _ in range(12)], ValueError, "too many dimensions"),
    }[what]
    good = [torch.randn(3, 4)]
    p2p, key = _one_send_p2p(metas_of(good) if cached else None)
    with pytest.raises(error, match=match):
        p2p.send(key, 1, tensors)
    assert p2p.num_sent == 0 and p2p.out == {}
    assert p2p.cache == ({(2, *key): metas_of(good)} if cached else {}), "the shapes both sides know are unchanged"
    p2p.send_aborts("TypeError: bad stage")
    first, payload = p2p.out[key]
    assert payload is None and first.numel() == (combined_size(metas_of(good)) if cached else HEADER_BYTES)
    with pytest.raises(PeerAbort, match="bad stage"):
        decode_header(first[:HEADER_BYTES].view(torch.int64), 0)


@pytest.mark.parametrize("cached", [False, True])
def test_a_send_writes_the_header_of_its_tensors(cached: bool) -> None:
    tensors = [torch.randn(int(torch.randint(1, 9, ())), 5, dtype=torch.float64).requires_grad_(), None,
               torch.randint(0, 7, (3,))]
    metas = metas_of(tensors)
    p2p, key = _one_send_p2p(metas if cached else None)
    p2p.send(key, 1, tensors)
    first, payload = p2p.out[key]
    assert (payload is None) == cached
    assert decode_header(first[:HEADER_BYTES].view(torch.int64), 0) == metas
    got = (first[HEADER_BYTES:] if cached else payload).clone()
    assert torch.equal(got[: tensors[0].numel() * 8].view(torch.float64), tensors[0].detach().reshape(-1))


def test_a_header_handed_out_cannot_change_later_ones() -> None:
    """Headers are cached per shapes; a caller writing into one it was given must not change what
    later sends (or a receiver's steady-state comparison) use."""
    metas = metas_of([torch.randn(int(torch.randint(2, 50, ())), 7), None])
    given = encode_header(metas)
    expected = given.clone()
    given.fill_(-1)
    assert torch.equal(encode_header(metas), expected)
    p2p, key = _one_send_p2p()
    p2p.send(key, 1, [torch.randn(*metas[0].shape), None])
    assert torch.equal(p2p.out[key][0][:HEADER_BYTES].view(torch.int64), expected)
    assert decode_header(expected, 0) == metas


def _random_schedule():
    """A schedule of a random family, rank count and chunk count (the seed is per test)."""
    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, ()))

    family = pick(0, 3)
    if family == 0:
        ranks = 2 * pick(1, 4)
        return dualpipe_schedule(ranks, 2 * pick(ranks, 2 * ranks + 1))
    if family == 1:
        ranks = pick(1, 8)
        return dualpipev_schedule(ranks, pick(2 * ranks, 4 * ranks + 3))
    ranks = pick(1, 8)
    return (one_f_one_b_schedule, zb1p_schedule)[family - 2](ranks, pick(1, 2 * ranks + 3))


def test_every_payload_slot_is_the_receivers_on_random_schedules() -> None:
    """A send's payload slot is, by definition, the slot its receiver computes for that transfer
    (its own formula: the clock time of the last round it posts before the consuming action), so
    the two post the payload in matching groups; ``transfer_rounds`` computes the sender's side in
    one pass over its sends. Checked on many random schedules, both modes."""
    for _ in range(40):
        sched = _random_schedule()
        for training in (True, False):
            plans = [transfer_rounds(sched, r, training) for r in range(sched.num_ranks)]
            for r, plan in enumerate(plans):
                sends = [s for sends, _ in plan.rounds for s in sends]
                recvs = [k for _, recvs in plan.rounds for k, _ in recvs]
                assert set(plan.slots) == {k for k, _ in sends} | set(recvs), (sched.name, r)
                for key, dst in sends:
                    assert plan.slots[key] == plans[dst].slots[key], (sched.name, training, r, key)
