"""DeepSeekMoE layer: fp32 router with the aux-loss-free selection bias, shared experts, and
routed experts computed as grouped GEMMs over expert-sorted tokens. With an expert-parallel
group the routed experts are sharded contiguously over its ranks and tokens travel with
`comm.all_to_all` (see model/ep.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model import router
from model.args import ModelArgs
from model.layers import MLP
from model.swiglu import grouped_swiglu


class Gate(nn.Module):
    """The router: a [E, dim] projection evaluated in fp32 (fp64 for fp64 models) and the
    non-learned `expert_bias` buffer used only to choose experts."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=args.torch_dtype))
        work = torch.float64 if args.torch_dtype == torch.float64 else torch.float32
        self.register_buffer("expert_bias", torch.zeros(args.n_routed_experts, dtype=work))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (topk_weights [T, k] fp32, topk_idx [T, k] int64, scores [T, E] fp32)."""
        a = self.args
        logits = F.linear(x.to(self.expert_bias.dtype), self.weight.to(self.expert_bias.dtype))
        return router.route(
            logits, self.expert_bias, topk=a.n_activated_experts, n_groups=a.n_expert_groups,
            topk_groups=a.n_limited_groups, score_func=a.score_func, route_scale=a.route_scale,
        )


class GroupedExperts(nn.Module):
    """`n_local` SwiGLU experts with stacked weights w1/w3 [E, inter, dim] and w2 [E, dim, inter],
    applied to tokens already sorted by expert: one GEMM per non-empty expert segment, no
    per-expert gathers (the gather happens once, in the sort). BF16/FP32 through
    `model.swiglu.grouped_swiglu` (one autograd node; outputs and gradients written in place),
    FP8 through `model.fp8.grouped_swiglu_fp8`."""

    def __init__(self, n_local: int, args: ModelArgs) -> None:
        super().__init__()
        dt, d, h = args.torch_dtype, args.dim, args.moe_inter_dim
        self.n_local = n_local
        self.fp8 = args.fp8
        self.w1 = nn.Parameter(torch.empty(n_local, h, d, dtype=dt))
        self.w2 = nn.Parameter(torch.empty(n_local, d, h, dtype=dt))
        self.w3 = nn.Parameter(torch.empty(n_local, h, d, dtype=dt))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, dim] sorted by expert, counts[e] rows for local expert e (sum = N) -> [N, dim]."""
        if self.fp8:
            from model.fp8 import grouped_swiglu_fp8

            return grouped_swiglu_fp8(x, self.w1, self.w2, self.w3, counts)
        return grouped_swiglu(x, self.w1, self.w2, self.w3, counts)


def sort_by_expert(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """For topk_idx [T, k] (-1 = not routed here): the order that lists (token, slot) pairs
    expert by expert, the token id of each listed pair, and the per-expert counts."""
    flat = topk_idx.flatten()
    valid = flat >= 0
    key = torch.where(valid, flat, n_experts)  # unrouted pairs sort last and are dropped
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(flat[valid], minlength=n_experts)
    n_valid = int(counts.sum())
    order = order[:n_valid]
    return order, order // topk_idx.size(1), counts.tolist()


class MoE(nn.Module):
    """y = shared_experts(x) + sum_k w_k * expert_{idx_k}(x). Records, per forward in training
    mode, the routed token counts per expert (accumulated until the bias update or
    `take_expert_load`) and the sequence-wise balance loss (`last_balance_loss`, a
    graph-connected scalar)."""

    def __init__(self, args: ModelArgs, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.args = args
        self.n_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if self.n_experts % self.ep_size:
            raise ValueError(f"n_routed_experts ({self.n_experts}) must be divisible by the EP group size ({self.ep_size})")
        self.n_local = self.n_experts // self.ep_size
        self.expert_start = self.ep_rank * self.n_local
        self.gate = Gate(args)
        self.experts = GroupedExperts(self.n_local, args)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, args) if args.n_shared_experts else None
        self.register_buffer("expert_load", torch.zeros(self.n_experts, dtype=torch.float64), persistent=False)
        self.last_balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, dim]
        weights, topk_idx, scores = self.gate(x)
        if self.training:  # eval/generation forwards do not steer the balance
            with torch.no_grad():
                self.expert_load += router.tokens_per_expert(topk_idx, self.n_experts).to(self.expert_load.dtype)
        self.last_balance_loss = router.sequence_balance_loss(scores, topk_idx, shape[0], self.topk, self.args.seq_aux_alpha)
        if self.ep_size > 1:  # shared experts run while the dispatch is in flight
            from model.ep import moe_ep_forward

            return moe_ep_forward(self, x, weights, topk_idx).view(shape)
        y = self.routed_local(x, weights, topk_idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def routed_local(self, x: torch.Tensor, weights: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """Routed experts on this process for x [T, dim] with topk_idx LOCAL to this module's
        experts (-1 = elsewhere): sort once, grouped GEMMs, weight, scatter-add back."""
        order, token_ids, counts = sort_by_expert(topk_idx, self.n_local)
        # index_select, not x[token_ids]: its backward is an index_add, not an accumulating index_put
        h = self.experts(x.index_select(0, token_ids), counts)  # [N, dim]
        h = h * weights.flatten()[order].unsqueeze(1).to(h.dtype)
        # in place into fresh zeros (the out-of-place form would copy them once more)
        return torch.zeros(x.shape, dtype=h.dtype, device=x.device).index_add_(0, token_ids, h)

    @torch.no_grad()
    def take_expert_load(self) -> torch.Tensor:
        """This process's accumulated load per expert since the last call; resets it."""
        load = self.expert_load.clone()
        self.expert_load.zero_()
        return load
