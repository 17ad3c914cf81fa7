"""async_finish, tested without timing: a peer holds back until the caller has looked at its
event (a signal over a second gloo group), so "returned before the data arrived" is certain."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from comm import all_to_all
from tests.comm.reference import Case, make_topk, make_x, make_z, reference_dispatch
from tests.harness.distributed import run_distributed


def held_back_peer(rank: int, world: int, case: Case) -> dict:
    holder = world - 1
    signal_group = dist.new_group(backend="gloo")
    buf = all_to_all.Buffer()
    idx, w = make_topk(case, rank)
    holder_idx, _ = make_topk(case, holder)
    assert all(bool(((holder_idx // case.experts_per_rank == r) & (holder_idx >= 0)).any()) for r in range(world))
    x = make_x(case, rank)
    _, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=case.num_experts)
    seen = {}

    def signal_or_wait() -> None:
        token = torch.zeros(1)
        if rank == 0:
            for peer in range(1, world):
                if peer != holder:
                    dist.recv(token, src=peer, group=signal_group)  # the others have looked too
            dist.send(token, dst=holder, group=signal_group)
        elif rank != holder:
            dist.send(token, dst=0, group=signal_group)
        else:
            dist.recv(token, src=0, group=signal_group)

    # dispatch with a handle (no count exchange): the holder starts only after the signal
    if rank == holder:
        signal_or_wait()
    recv_x, _, _, _, _, event = buf.dispatch(x * 2, handle=handle, async_finish=True)
    if rank != holder:
        seen["dispatch_complete_early"] = event.is_complete()
        signal_or_wait()
    with event:
        pass
    assert event.is_complete()
    # rows were set up without the holder's own sync dispatch: build the full reference
    want = reference_dispatch(case, rank, lambda s, rows: [make_x(case, s, rows=rows) * 2]).rows[0]
    assert torch.equal(recv_x, want), "async dispatch result after wait"

    # combine: the holder holds back again
    z = make_z(case, rank, torch.arange(recv_x.shape[0]))
    if rank == holder:
        signal_or_wait()
    combined, _, event = buf.combine(z, handle, async_finish=True)
    if rank != holder:
        seen["combine_complete_early"] = event.is_complete()
        signal_or_wait()
    event.current_stream_wait()
    sync_combined, _, _ = buf.combine(z, handle)
    assert torch.equal(combined, sync_combined), "async and sync combine differ"
    dist.destroy_process_group(signal_group)
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_async_returns_before_a_held_back_peer_sends(world: int) -> None:
    # One expert per rank and k = 9 > E: with 50+ tokens, each peer gets rows from the holder
    # (checked on the ranks), so its all-to-all cannot complete before the holder sends.
    case = Case(random.getrandbits(40), tuple(random.randint(50, 300) for _ in range(world)), 100, 9, 1)
    results = run_distributed(held_back_peer, world, case)
    for rank, seen in enumerate(results[:-1]):
        assert seen == {"dispatch_complete_early": False, "combine_complete_early": False}, (rank, seen)
