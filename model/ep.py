"""Expert parallelism for `MoE`: routed experts sharded contiguously over the EP group, tokens
moved with `comm.all_to_all`'s differentiable dispatch/combine (DeepEP's semantics: a token
goes to each rank holding any of its experts once, combine sums the ranks' weighted partial
outputs in FP32)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.moe import MoE

_EP_DTYPES = (torch.float32, torch.bfloat16)


def _buffer(moe: MoE):
    from comm.all_to_all import Buffer

    buf = getattr(moe, "_ep_buffer", None)
    if buf is None:
        buf = Buffer(moe.ep_group)
        moe._ep_buffer = buf
    return buf


def routed_experts_ep(moe: MoE, x: torch.Tensor, weights: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """x [T, dim], weights [T, k] fp32, topk_idx [T, k] GLOBAL expert ids -> routed output [T, dim].
    Every rank of the group must call it (dispatch and combine are collectives, forward and
    backward)."""
    from comm.all_to_all import combine, dispatch

    if x.dtype not in _EP_DTYPES:
        raise TypeError(f"expert parallel runs in float32 or bfloat16 (comm.all_to_all's dtypes), got {x.dtype}")
    buf = _buffer(moe)
    recv_x, recv_idx, recv_w, _, handle = dispatch(buf, x, topk_idx, weights.float(), moe.n_experts)
    # recv_idx is local to this rank (-1: expert elsewhere, weight 0 there)
    y = moe.routed_local(recv_x, recv_w, recv_idx)
    return combine(buf, y, handle)


def shard_state_dict(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict cut down to what `model` holds: each MoE's stacked expert
    tensors `...experts.w{1,2,3}` keep only this EP rank's contiguous rows; keys the model lacks
    (e.g. other pipeline stages' layers) are dropped."""
    from model.moe import MoE

    own = model.state_dict()
    starts = {name + ".experts.": m for name, m in model.named_modules() if isinstance(m, MoE)}
    out = {}
    for key, value in full.items():
        if key not in own:
            continue
        for prefix, m in starts.items():
            if key.startswith(prefix):
                value = value[m.expert_start : m.expert_start + m.n_local]
                break
        out[key] = value
    return out
