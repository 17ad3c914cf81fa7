"""Node-limited (hierarchical) mode gives the flat mode's results: dispatch bit for bit (rows,
order, top-k, counts, FP8), combine within the BF16 tolerance of the float64 reference."""

from __future__ import annotations

import random

import pytest
import torch

import ops
from comm import all_to_all
from tests.comm.reference import Case, make_topk, make_x, make_z, reference_node_partials
from tests.harness.distributed import run_distributed


def node_vs_flat(rank: int, world: int, case: Case, ranks_per_node: int, async_finish: bool) -> dict:
    flat, node = all_to_all.Buffer(), all_to_all.Buffer(ranks_per_node=ranks_per_node)
    idx, w = make_topk(case, rank)
    x = make_x(case, rank)
    _, per_node, _, _, _ = node.get_dispatch_layout(idx, case.num_experts)
    nodes = world // ranks_per_node
    in_node = torch.stack([((idx >= 0) & (idx // (case.experts_per_rank * ranks_per_node) == n)).any(1)
                           for n in range(nodes)], 1)
    assert per_node.tolist() == in_node.sum(0).tolist(), "num_tokens_per_rdma_rank (per node)"

    a = flat.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=case.num_experts, expert_alignment=case.alignment)
    b = node.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=case.num_experts,
                      expert_alignment=case.alignment, async_finish=async_finish)
    b[5].current_stream_wait()
    for i, what in enumerate(["recv_x", "recv_topk_idx", "recv_topk_weights"]):
        assert torch.equal(a[i], b[i]), what
    assert a[3] == b[3], "num_recv_tokens_per_expert_list"

    q, sf = ops.per_token_cast_to_fp8(x)
    (qa, sa), *_ = flat.dispatch((q, sf), handle=a[4])
    (qb, sb), *_ = node.dispatch((q, sf), handle=b[4])
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb), "FP8 with handle"

    z = make_z(case, rank, torch.arange(a[0].shape[0]))
    ca, wa, _ = flat.combine(z, a[4], topk_weights=a[2])
    cb, wb, event = node.combine(z, b[4], topk_weights=b[2], async_finish=async_finish)
    event.current_stream_wait()
    partials = reference_node_partials(case, rank, lambda d, rows: make_z(case, d, rows), ranks_per_node)
    want = partials.sum(0)
    assert torch.equal(wa, wb), "combined weights"
    # The node mode rounds each node's FP32 partial sum to BF16 before it crosses nodes (as
    # DeepEP's internode combine does: half the cross-node bytes), then the total: two roundings
    # of relative error <= 2^-8 each, bounded by the partials' magnitudes (which may cancel, so a
    # bound relative to the total alone does not hold).
    bound = 2.0**-8 * (partials.abs().sum(0) + want.abs()) * (1 + 1e-6)
    excess = ((cb.double() - want).abs() - bound).max().item() if want.numel() else 0.0
    return {"flat": ops.calc_diff(ca, want), "node_excess": excess}


@pytest.mark.parametrize("world,ranks_per_node", [(4, 2), (8, 2), (8, 4)])
def test_node_limited_equals_flat(world: int, ranks_per_node: int) -> None:
    tokens = tuple(random.randint(0, 300) for _ in range(world))
    case = Case(random.getrandbits(40), tokens, random.choice([1, 100]), random.randint(1, 9), random.randint(1, 4),
                random.choice([1, 4]))
    for rank, d in enumerate(run_distributed(node_vs_flat, world, case, ranks_per_node, random.random() < 0.5)):
        assert d["flat"] < 5e-6 and d["node_excess"] <= 0.0, (rank, case, d)
