"""Differentiable dispatch and combine, for use inside a model.

The backward of a dispatch is a combine of the gradients (each token's gradient is the sum of
the gradients of its copies); the backward of a combine is a dispatch along the same handle.
Gradients reach x and topk_weights: the router learns through the weights.
"""

from __future__ import annotations

import torch

from comm.buffer import Buffer
from comm.layout import DispatchHandle

__all__ = ["combine", "dispatch"]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer: Buffer, topk_idx, num_experts: int, expert_alignment: int, meta: list):
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, expert_alignment=expert_alignment)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        meta.extend([counts, handle])
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_idx, grad_recv_w):
        (recv_idx,) = ctx.saved_tensors
        handle: DispatchHandle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((handle.num_recv_tokens, 1), dtype=ctx.x_dtype)
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(recv_idx.shape, dtype=torch.float32, device=recv_idx.device)
        # Slots whose expert lives elsewhere were constant zeros: no gradient flows back from them.
        grad_recv_w = grad_recv_w.float().masked_fill(recv_idx < 0, 0.0)
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), handle, topk_weights=grad_recv_w.contiguous())
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer: Buffer, handle: DispatchHandle):
        ctx.buffer, ctx.handle = buffer, handle
        combined, _, _ = buffer.combine(x, handle)
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_x, *_ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return grad_x, None, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             expert_alignment: int = 1):
    """Differentiable ``Buffer.dispatch`` (synchronous; x a float tensor, not an FP8 pair).

    Args:
        buffer: the Buffer (its group is the expert-parallel group).
        x: [T, H] float32/bfloat16/float16/float64 (comm.all_to_all.FLOAT_DTYPES); float64 rows
            move bit-exactly and their gradients are summed in float64.
        topk_idx: [T, k] int64 global expert indices (-1: none).
        topk_weights: [T, k] float32 (gradients flow to it).
        num_experts: E, divisible by the group size.

    Returns:
        (recv_x [N, H], recv_topk_idx [N, k] local, recv_topk_weights [N, k],
        num_recv_tokens_per_expert_list, handle). Every rank must run the backward (it
        communicates), as with any collective inside autograd.
    """
    meta: list = []
    recv_x, recv_idx, recv_w = _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, expert_alignment, meta)
    counts, handle = meta
    return recv_x, recv_idx, recv_w, counts, handle


def combine(buffer: Buffer, x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Differentiable ``Buffer.combine``: x [N, H] (already weighted) -> combined [T, H]."""
    return _Combine.apply(x, buffer, handle)
