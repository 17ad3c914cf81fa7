"""Expert-major permutation of dispatched tokens, for the grouped GEMMs of an MoE layer.

``permute`` copies received row n once per local expert in its ``recv_topk_idx`` row into that
expert's segment (segments in expert order, rows in token order, each padded with zero rows to a
multiple of ``alignment``) and returns ``m_indices`` [M] int32 naming each row's expert, -1 for
padding: the layout ``m_grouped_fp8_gemm_nt_contiguous`` consumes. ``unpermute`` maps the expert
outputs back, out[n] = sum_j weights[n, j] * y[row of (n, j)], accumulated in FP32 (FP64 for
float64 y) - the
weighted partial sum each rank sends to ``combine``. Both are differentiable (float inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comm import kernels
from ops.checks import check_dim, check_dtype, check_positive_int, check_tensor

__all__ = ["PermuteHandle", "permute", "unpermute"]


@dataclass(frozen=True, eq=False)
class PermuteHandle:
    """row_pos [N, k] int64: the expert-major row of each (token, slot), -1 if no local expert;
    num_rows: M, rows of the permuted tensor (padding included)."""

    row_pos: torch.Tensor
    num_rows: int


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, num_local_experts, alignment):
        (out,), m_indices, row_pos = kernels.permute([x], topk_idx, num_local_experts, alignment)
        ctx.save_for_backward(row_pos)
        ctx.mark_non_differentiable(m_indices, row_pos)
        return out, m_indices, row_pos

    @staticmethod
    def backward(ctx, grad_out, _grad_m, _grad_pos):
        (row_pos,) = ctx.saved_tensors
        # Each token's gradient is the sum of its copies' gradients: an unweighted unpermute.
        ones = (row_pos >= 0).float()
        return kernels.unpermute(grad_out.contiguous(), row_pos, ones), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, row_pos):
        ctx.save_for_backward(y, weights, row_pos)
        return kernels.unpermute(y.contiguous(), row_pos, weights.contiguous())

    @staticmethod
    def backward(ctx, grad):
        y, weights, row_pos = ctx.saved_tensors
        valid = row_pos >= 0
        rows = row_pos[valid]  # [V]
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32  # as the forward's sum
        g = grad.to(acc)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # dy[row of (n, j)] = w[n, j] * grad[n]; padding rows get zero.
            gy = torch.zeros(y.shape, dtype=acc, device=y.device)
            gy[rows] = weights.to(acc)[valid].unsqueeze(1) * g.unsqueeze(1).expand(-1, row_pos.shape[1], -1)[valid]
            grad_y = gy.to(y.dtype)
        if ctx.needs_input_grad[1]:
            # dw[n, j] = <grad[n], y[row of (n, j)]>
            gw = torch.zeros(weights.shape, dtype=acc, device=y.device)
            gw[valid] = (g.unsqueeze(1).expand(-1, row_pos.shape[1], -1)[valid] * y.to(acc)[rows]).sum(-1)
            grad_w = gw.float()  # topk_weights are float32
        return grad_y, grad_w, None


def permute(x, topk_idx: torch.Tensor, num_local_experts: int, alignment: int = 1):
    """Received tokens -> expert-major rows.

    Args:
        x: [N, H] float32/bfloat16/float16/float64 (differentiable), or an (x_fp8 [N, H],
            scales [N, S] float32) pair (both permuted the same way).
        topk_idx: [N, k] int64 local expert indices (dispatch's recv_topk_idx; -1: elsewhere).
        num_local_experts: L, experts on this rank.
        alignment: segment size multiple (the grouped GEMM's M alignment).

    Returns:
        (x_perm [M, H] (same form as x), m_indices [M] int32 (-1: padding row), handle).
    """
    check_positive_int("num_local_experts", num_local_experts)
    check_positive_int("alignment", alignment)
    pair = isinstance(x, tuple)
    parts = list(x) if pair else [check_tensor("x", x)]
    for i, p in enumerate(parts):
        check_tensor(f"x[{i}]", p)
        check_dim(f"x[{i}]" if pair else "x", p, 2)
    if not pair:
        check_dtype("x", parts[0], kernels.FLOAT_DTYPES)
    topk_idx = check_tensor("topk_idx", topk_idx)
    check_dtype("topk_idx", topk_idx, (torch.int64,))
    check_dim("topk_idx", topk_idx, 2)
    if any(p.shape[0] != topk_idx.shape[0] for p in parts):
        raise ValueError(f"x and topk_idx must have the same rows, got {[tuple(p.shape) for p in parts]} and "
                         f"{tuple(topk_idx.shape)}")
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_local_experts):
        raise ValueError(f"topk_idx entries must lie in [-1, {num_local_experts}) (local experts)")
    topk_idx = topk_idx.contiguous()
    if pair:
        outs, m_indices, row_pos = kernels.permute([p.contiguous() for p in parts], topk_idx, num_local_experts, alignment)
        return (outs[0], outs[1]), m_indices, PermuteHandle(row_pos, outs[0].shape[0])
    out, m_indices, row_pos = _Permute.apply(parts[0].contiguous(), topk_idx, num_local_experts, alignment)
    return out, m_indices, PermuteHandle(row_pos, out.shape[0])


def unpermute(y: torch.Tensor, topk_weights: torch.Tensor, handle: PermuteHandle) -> torch.Tensor:
    """Expert-major rows -> per-token weighted sums (FP32 accumulation, FP64 for float64 y),
    differentiable in y and weights.

    Args:
        y: [M, H] float32/bfloat16/float16/float64, the experts' outputs in permute's row order.
        topk_weights: [N, k] float32 (dispatch's recv_topk_weights).
        handle: permute's handle.

    Returns:
        [N, H] in y's dtype: sum over local slots j of topk_weights[n, j] * y[row of (n, j)].
    """
    y = check_tensor("y", y)
    check_dtype("y", y, kernels.FLOAT_DTYPES)
    check_dim("y", y, 2)
    if not isinstance(handle, PermuteHandle):
        raise TypeError(f"handle must be the PermuteHandle permute returned, got {type(handle).__name__}")
    if y.shape[0] != handle.num_rows:
        raise ValueError(f"y must have the permuted row count {handle.num_rows}, got shape {tuple(y.shape)}")
    topk_weights = check_tensor("topk_weights", topk_weights)
    check_dtype("topk_weights", topk_weights, (torch.float32,))
    if topk_weights.shape != handle.row_pos.shape:
        raise ValueError(f"topk_weights must have shape {tuple(handle.row_pos.shape)}, got {tuple(topk_weights.shape)}")
    return _Unpermute.apply(y, topk_weights, handle.row_pos)
