"""Dispatch layout: who receives which token, and the handle that remembers it.

Experts are split evenly and contiguously over the ranks: expert e lives on rank
e // (num_experts // num_ranks). A token goes to a rank once, however many of its top-k experts
live there. ``DispatchHandle`` keeps what a dispatch learned (send positions, split sizes) so
that a combine can send the rows back, and a dispatch with ``handle=`` can repeat the exchange.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ops.checks import check_dim, check_dtype, check_tensor

__all__ = ["DispatchHandle", "check_topk", "new_owner_id"]

_owner_ids = itertools.count(1)


def new_owner_id() -> int:
    """A serial number per Buffer, so a handle from another Buffer is recognised."""
    return next(_owner_ids)


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """What a dispatch learned; pass it to ``combine`` and to ``dispatch(handle=...)``.

    Attributes:
        owner: serial number of the Buffer that made it.
        num_ranks: ranks of that Buffer's group.
        num_tokens: T, tokens this rank sent (rows of x).
        num_recv_tokens: N, rows this rank received.
        is_token_in_rank: [T, R] bool.
        send_pos: [T, R] int64, row of the send buffer holding (token, rank), -1 if not sent.
        send_splits / recv_splits: rows sent to / received from each rank.
        node: the node-limited mode's two-stage handle, None in flat mode.
    """

    owner: int
    num_ranks: int
    num_tokens: int
    num_recv_tokens: int
    is_token_in_rank: torch.Tensor
    send_pos: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    node: object = None


def check_topk(topk_idx: object, topk_weights: object, num_tokens: int, num_experts: int) -> None:
    """topk_idx int64 [T, k] with entries in [-1, num_experts); topk_weights None or float32 [T, k]."""
    topk_idx = check_tensor("topk_idx", topk_idx)
    check_dtype("topk_idx", topk_idx, (torch.int64,))
    check_dim("topk_idx", topk_idx, 2)
    if topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx must have one row per token of x ({num_tokens}), got shape {tuple(topk_idx.shape)}")
    if topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx entries must lie in [-1, {num_experts}) (num_experts = {num_experts}), "
                             f"got values from {lo} to {hi}")
    if topk_weights is not None:
        topk_weights = check_tensor("topk_weights", topk_weights)
        check_dtype("topk_weights", topk_weights, (torch.float32,))
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(f"topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, "
                             f"got {tuple(topk_weights.shape)}")
