"""Gradients through dispatch -> permute -> per-expert linear -> unpermute -> combine, on gloo
ranks, equal those of a single-process float64 run of the same MoE layer (to x, topk_weights and
the expert weights)."""

from __future__ import annotations

import random

import pytest
import torch

import ops
from comm import all_to_all
from tests.comm.reference import Case, hashed_uniform, make_topk, make_x


def _expert_weights(case: Case) -> torch.Tensor:
    e, h = case.num_experts, case.hidden
    return hashed_uniform(case.seed, 10_000, 5, torch.arange(e * h), h).view(e, h, h) * 0.3


def _upstream(case: Case, src: int) -> torch.Tensor:
    return hashed_uniform(case.seed, src, 6, torch.arange(case.tokens[src]), case.hidden)


def moe_rank(rank: int, world: int, case: Case, dtype: torch.dtype = torch.float32) -> dict:
    buf = all_to_all.Buffer()
    epr = case.experts_per_rank
    idx, w = make_topk(case, rank)
    x = make_x(case, rank, dtype).requires_grad_()
    wt = w.clone().requires_grad_()  # top-k weights are float32 in every mode (the router's dtype)
    w_local = _expert_weights(case)[rank * epr:(rank + 1) * epr].to(dtype).requires_grad_()

    recv_x, recv_idx, recv_w, _, handle = all_to_all.dispatch(buf, x, idx, wt, case.num_experts)
    xp, m_indices, ph = all_to_all.permute(recv_x, recv_idx, epr, alignment=4)
    y = torch.zeros(xp.shape[0], case.hidden, dtype=dtype)
    for e in range(epr):  # one linear per local expert over its segment
        rows = (m_indices == e).nonzero().flatten()
        y = y.index_put((rows,), xp[rows] @ w_local[e])
    out = all_to_all.combine(buf, all_to_all.unpermute(y, recv_w, ph), handle)
    assert out.dtype == dtype
    (out * _upstream(case, rank).to(dtype)).sum().backward()

    # Single-process float64 reference over every rank's tokens.
    W = _expert_weights(case).requires_grad_()
    xs, ws, loss = [], [], 0.0
    for src in range(world):
        s_idx, s_w = make_topk(case, src)
        xs.append(make_x(case, src, dtype).double().requires_grad_())
        ws.append(s_w.double().requires_grad_())
        valid = s_idx >= 0
        expert_out = torch.einsum("th,tkhg->tkg", xs[-1], W[s_idx.clamp(min=0)])  # [T, k, H]
        o = (expert_out * (ws[-1] * valid).unsqueeze(-1)).sum(1)
        loss = loss + (o * _upstream(case, src)).sum()
    loss.backward()
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # largest error relative to the largest value
        return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0

    return {
        "x_rel": rel(x.grad, xs[rank].grad),
        "experts_rel": rel(w_local.grad, W.grad[rank * epr:(rank + 1) * epr]),
        "x": ops.calc_diff(x.grad, xs[rank].grad),
        "topk_weights": ops.calc_diff(wt.grad, ws[rank].grad * (idx >= 0)),
        "experts": ops.calc_diff(w_local.grad, W.grad[rank * epr:(rank + 1) * epr]),
        # a rank whose top-k slots are all -1 (or that has no tokens) routes nothing: no gradient
        "nonzero": bool(wt.grad.abs().sum() > 0) if bool((idx >= 0).any()) else True,
    }


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gradients_match_single_process(world: int) -> None:
    from tests.harness.distributed import run_distributed

    case = Case(random.getrandbits(40), tuple(random.randint(0, 40) for _ in range(world)), 24,
                random.randint(1, 6), random.randint(1, 3))
    for rank, d in enumerate(run_distributed(moe_rank, world, case)):
        assert d["x"] < 1e-10 and d["topk_weights"] < 1e-10 and d["experts"] < 1e-10, (rank, d, case)
        assert d["nonzero"]


@pytest.mark.parametrize("world", [2, 3])
def test_float64_gradients_match_single_process(world: int) -> None:
    """The whole path in float64 (rows, sums, gradients): x's and the experts' gradients agree with
    the float64 reference to float64 rounding: largest relative error 1e-12 (an FP32 step anywhere
    would give ~1e-7; calc_diff bottoms out at ~1e-16 so it cannot tell). The top-k weights'
    gradients are float32 (that is their dtype), hence calc_diff there."""
    from tests.harness.distributed import run_distributed

    case = Case(random.getrandbits(40), tuple(random.randint(0, 40) for _ in range(world)), 24,
                random.randint(1, 6), random.randint(1, 3))
    for rank, d in enumerate(run_distributed(moe_rank, world, case, torch.float64)):
        assert d["x_rel"] < 1e-12 and d["experts_rel"] < 1e-12 and d["topk_weights"] < 1e-10, (rank, d, case)
        assert d["nonzero"]
