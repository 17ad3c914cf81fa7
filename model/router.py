"""DeepSeekMoE routing as pure functions (no state): scores, group-limited top-k with the
aux-loss-free selection bias, the sequence-wise balance loss and the bias update rule.

Reference: DeepSeek-V3 report, section 2.1.2 (shared/REFERENCE.md "DeepSeekMoE routing")."""

from __future__ import annotations

import torch


def route(
    logits: torch.Tensor,
    expert_bias: torch.Tensor,
    *,
    topk: int,
    n_groups: int,
    topk_groups: int,
    score_func: str,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] (fp32 or fp64) -> (topk_weights [T, k], topk_idx [T, k] int64, scores [T, E]).

    1. scores = sigmoid(logits) or softmax(logits).
    2. choice = scores + expert_bias: the bias steers SELECTION only.
    3. with n_groups > 1, a group's score is the sum of its top-2 choice scores; only the best
       topk_groups groups stay eligible (node-limited routing).
    4. the top-k eligible experts by choice score; their weights are gathered from the UNBIASED
       scores, normalised to sum 1 for sigmoid scores, and multiplied by route_scale.
    """
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + expert_bias.to(scores.dtype)
    n_tokens, n_experts = choice.shape
    if n_groups > 1:
        grouped = choice.view(n_tokens, n_groups, n_experts // n_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = group_scores.topk(topk_groups, dim=-1).indices
        masked = torch.ones(n_tokens, n_groups, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
    topk_idx = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, topk_idx)
    if score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, topk_idx, scores


def tokens_per_expert(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many (token, slot) pairs chose each expert: [E] int64."""
    return torch.bincount(topk_idx.flatten(), minlength=n_experts)


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, topk: int, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (report eq. 17-20), averaged over sequences:
    L = alpha * sum_i f_i * P_i, f_i = E / (k * T) * count_i (not differentiable),
    P_i = mean over the sequence's tokens of s_i / sum_j s_j.
    scores [B*S, E], topk_idx [B*S, k] for `batch` sequences of equal length."""
    n_experts = scores.size(-1)
    seq = scores.size(0) // batch
    normalised = scores / scores.sum(dim=-1, keepdim=True)
    p = normalised.view(batch, seq, n_experts).mean(dim=1)  # [B, E]
    counts = torch.zeros(batch, n_experts, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, topk_idx.view(batch, seq * topk), torch.ones(batch, seq * topk, dtype=scores.dtype, device=scores.device))
    f = counts * (n_experts / (topk * seq))
    return alpha * (f * p).sum(dim=-1).mean()


def bias_update(load: torch.Tensor, speed: float) -> torch.Tensor:
    """Aux-loss-free balancing step: +speed for under-loaded experts, -speed for over-loaded
    ones, 0 at exactly the mean (bias += speed * sign(mean_load - load))."""
    load = load.to(torch.float64)
    return speed * torch.sign(load.mean() - load)
