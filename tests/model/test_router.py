"""Routing: group limit, unbiased weights, balance loss, and the bias update balancing load."""

from __future__ import annotations

import pytest
import torch

from model import router


def _reference_route(logits, bias, topk, n_groups, topk_groups, score_func, route_scale):
    """Token-by-token float64 routing written from the report's description."""
    logits = logits.double()
    out_w, out_i = [], []
    for t in range(logits.size(0)):
        s = logits[t].sigmoid() if score_func == "sigmoid" else logits[t].softmax(-1)
        c = s + bias.double()
        per = c.numel() // n_groups
        group_score = [sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_groups)]
        group_score = torch.tensor([sum(v) for v in group_score])
        allowed = set(group_score.argsort(descending=True)[:topk_groups].tolist()) if n_groups > 1 else {0}
        cand = sorted((e for e in range(c.numel()) if e // per in allowed), key=lambda e: -c[e].item())[:topk]
        w = s[cand]
        if score_func == "sigmoid":
            w = w / w.sum()
        out_w.append(w * route_scale)
        out_i.append(cand)
    return torch.stack(out_w), torch.tensor(out_i)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("n_experts", "n_groups", "topk_groups", "topk"), [(16, 4, 2, 3), (12, 3, 1, 2), (8, 1, 1, 4), (256, 8, 4, 8)])
def test_route_matches_reference_and_respects_group_limit(score_func, n_experts, n_groups, topk_groups, topk) -> None:
    logits = torch.randn(37, n_experts, dtype=torch.float64) * 2
    bias = torch.randn(n_experts, dtype=torch.float64) * 0.3
    w, idx, _scores = router.route(logits, bias, topk=topk, n_groups=n_groups, topk_groups=topk_groups,
                                  score_func=score_func, route_scale=2.5)
    ref_w, ref_idx = _reference_route(logits, bias, topk, n_groups, topk_groups, score_func, 2.5)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    order, ref_order = idx.argsort(-1), ref_idx.argsort(-1)
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), rtol=0, atol=1e-12)
    groups_used = (idx // (n_experts // n_groups)).tolist()
    assert max(len(set(g)) for g in groups_used) <= topk_groups


def test_weights_come_from_unbiased_scores() -> None:
    # A huge bias on expert 0 forces its selection but must not change its weight.
    logits = torch.randn(20, 8, dtype=torch.float64)
    bias = torch.zeros(8, dtype=torch.float64)
    bias[0] = 100.0
    w, idx, _scores = router.route(logits, bias, topk=2, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0)
    assert (idx == 0).any(dim=1).all()
    s = logits.sigmoid()
    expected = s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True)
    assert torch.allclose(w, expected, atol=1e-14, rtol=0)
    w_unbiased, *_ = router.route(logits, bias * 0, topk=2, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0)
    assert not torch.allclose(w, w_unbiased)


def test_bias_update_moves_skewed_load_toward_balance() -> None:
    # Skewed synthetic router: token features favour the first experts strongly.
    n_experts, topk = 16, 2
    x = torch.randn(1024, 32, dtype=torch.float64)
    w_gate = torch.randn(n_experts, 32, dtype=torch.float64) * 0.3
    skew = torch.linspace(3.0, -3.0, n_experts, dtype=torch.float64)
    bias = torch.zeros(n_experts, dtype=torch.float64)

    logits = x @ w_gate.T + skew

    def imbalance() -> tuple[float, torch.Tensor]:
        _, idx, _ = router.route(logits, bias, topk=topk, n_groups=4, topk_groups=2,
                                 score_func="sigmoid", route_scale=1.0)
        load = router.tokens_per_expert(idx, n_experts).double()
        return (load.max() / load.mean()).item(), load

    start, _ = imbalance()
    for step in range(400):
        _, load = imbalance()
        bias += router.bias_update(load, 0.02 if step < 250 else 0.004)
    end, _ = imbalance()
    assert start > 3.0, start
    assert end < 1.3, (start, end)


def test_bias_update_signs() -> None:
    load = torch.tensor([10.0, 0.0, 5.0, 5.0])
    assert router.bias_update(load, 0.5).tolist() == [-0.5, 0.5, 0.0, 0.0]


def test_sequence_balance_loss_matches_formula() -> None:
    batch, seq, n_experts, topk, alpha = 3, 11, 8, 2, 0.01
    logits = torch.randn(batch * seq, n_experts, dtype=torch.float64)
    _, idx, scores = router.route(logits, torch.zeros(n_experts, dtype=torch.float64), topk=topk, n_groups=1,
                                  topk_groups=1, score_func="sigmoid", route_scale=1.0)
    got = router.sequence_balance_loss(scores, idx, batch, topk, alpha)
    total = 0.0
    for b in range(batch):
        rows = slice(b * seq, (b + 1) * seq)
        s = scores[rows] / scores[rows].sum(-1, keepdim=True)
        for i in range(n_experts):
            f = n_experts / (topk * seq) * (idx[rows] == i).sum().item()
            total += f * s[:, i].mean().item()
    assert got.item() == pytest.approx(alpha * total / batch, rel=1e-12)
