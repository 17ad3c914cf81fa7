"""FP8 training of linear layers, as DeepSeek-V3 trains them (report, section 3.3).

All three GEMMs of a linear layer run in FP8 with FP32 promotion every 128 K:

* Fprop  Y  = X @ W^T:   X in 1x128 tiles (per token), W in 128x128 blocks.
* Dgrad  dX = dY @ W:    dY in 1x128 tiles; W^T in 128x128 blocks. A 128x128 block of W^T is a
  transposed block of W with the same scale, so the forward's quantized W is reused: its bytes
  are transposed and its block-scale matrix transposed, nothing is quantized again.
* Wgrad  dW = dY^T @ X:  both operands in 1x128 tiles along the token dimension (the reduction),
  from ``transposed_per_token_cast_to_fp8``; X^T is quantized in the forward and saved in FP8.

The master weight and its gradient keep the weight's dtype (float32 or bfloat16); dW is
accumulated in FP32 and rounded once. The bias (optional) is added in the output dtype and its
gradient is summed in FP32.

``grouped_fp8_linear`` does the same for MoE experts whose tokens are laid out contiguously by
expert, on top of the m-grouped (Fprop, Dgrad) and k-grouped (Wgrad) GEMMs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ops.checks import FLOAT_INPUT_DTYPES, check_dim, check_dtype, check_tensor
from ops.gemm import (
    fp8_gemm_nt,
    grouped_transposed_per_token_cast_to_fp8,
    k_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
)
from ops.quant import per_block_cast_to_fp8, per_token_cast_to_fp8, transposed_per_token_cast_to_fp8

__all__ = ["fp8_linear", "grouped_fp8_linear"]


def _gemm_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM writes bf16 or fp32; other dtypes (fp16) are produced in fp32 and cast."""
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def _transposed_blocks(wq: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [.., N, K] in 128x128 blocks -> W^T [.., K, N] in 128x128 blocks (same scales, transposed)."""
    return wq.transpose(-1, -2).contiguous(), sw.transpose(-1, -2).contiguous()


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).contiguous()  # [T, K]
        n = weight.shape[0]
        xq, sx = per_token_cast_to_fp8(x2)
        wq, sw = per_block_cast_to_fp8(weight.contiguous())
        y = torch.empty(x2.shape[0], n, dtype=_gemm_out_dtype(x.dtype), device=x.device)
        fp8_gemm_nt((xq, sx), (wq, sw), y)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        xt = transposed_per_token_cast_to_fp8(x2) if weight.requires_grad else (None, None)
        ctx.save_for_backward(wq, sw, *xt)
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*lead, n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        wq, sw, xtq, sxt = ctx.saved_tensors
        n, k = wq.shape
        dy2 = dy.reshape(-1, n).contiguous()  # [T, N]
        if dy2.dtype not in FLOAT_INPUT_DTYPES:
            dy2 = dy2.float()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # Dgrad: dX [T, K] = dY [T, N] @ (W^T [K, N])^T
            dq, sd = per_token_cast_to_fp8(dy2)
            dx = torch.empty(dy2.shape[0], k, dtype=_gemm_out_dtype(ctx.x_dtype), device=dy.device)
            fp8_gemm_nt((dq, sd), _transposed_blocks(wq, sw), dx)
            dx = dx.to(ctx.x_dtype).view(*dy.shape[:-1], k)
        if ctx.needs_input_grad[1]:  # Wgrad: dW [N, K] = dY^T [N, T] @ (X^T [K, T])^T
            dtq, sdt = transposed_per_token_cast_to_fp8(dy2)
            dw = torch.empty(n, k, dtype=torch.float32, device=dy.device)
            fp8_gemm_nt((dtq, sdt), (xtq, sxt), dw)
            dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db


def _check_linear_args(x: object, weight: object, bias: object, weight_dims: int) -> None:
    x = check_tensor("x", x)
    weight = check_tensor("weight", weight)
    check_dtype("x", x, FLOAT_INPUT_DTYPES)
    check_dtype("weight", weight, FLOAT_INPUT_DTYPES)
    check_dim("weight", weight, weight_dims)
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x must be [..., K] with K={weight.shape[-1]} (weight's last dimension), got {list(x.shape)}")
    if bias is not None:
        bias = check_tensor("bias", bias)
        check_dtype("bias", bias, FLOAT_INPUT_DTYPES)
        if tuple(bias.shape) != (weight.shape[-2],):
            raise ValueError(f"bias must have shape [{weight.shape[-2]}], got {list(bias.shape)}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"x, weight and bias must be on one device, got {sorted(map(str, devices))}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T + bias with all three GEMMs (forward, dX, dW) in FP8; differentiable.

    Args:
        x: [..., K] float32, bfloat16 or float16.
        weight: [N, K] master weight (float32 or bfloat16); its gradient has its dtype.
        bias: optional [N].

    Returns:
        y [..., N] in x's dtype.
    """
    _check_linear_args(x, weight, bias, 2)
    return _FP8Linear.apply(x, weight, bias)


def _sizes(name: str, sizes: object, total: int) -> list[int]:
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise TypeError(f"{name} must be a list (or 1-D tensor) of non-negative ints, got {sizes!r}")
    if sum(sizes) != total:
        raise ValueError(f"{name} must sum to the number of tokens ({total}), got {sum(sizes)}")
    return list(sizes)


class _GroupedFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        g, n, _k = weight.shape
        m_indices = torch.repeat_interleave(
            torch.arange(g, dtype=torch.int32), torch.tensor(sizes, dtype=torch.int64)
        ).to(x.device)
        xq, sx = per_token_cast_to_fp8(x)
        blocks = [per_block_cast_to_fp8(weight[e].contiguous()) for e in range(g)]
        wq, sw = torch.stack([b[0] for b in blocks]), torch.stack([b[1] for b in blocks])
        y = torch.empty(x.shape[0], n, dtype=_gemm_out_dtype(x.dtype), device=x.device)
        m_grouped_fp8_gemm_nt_contiguous((xq, sx), (wq, sw), y, m_indices)
        xt = grouped_transposed_per_token_cast_to_fp8(x, sizes) if weight.requires_grad else (None, None)
        ctx.save_for_backward(wq, sw, m_indices, *xt)
        ctx.sizes, ctx.x_dtype, ctx.w_dtype = sizes, x.dtype, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        wq, sw, m_indices, xtq, sxt = ctx.saved_tensors
        g, n, k = wq.shape
        dy = dy.contiguous()
        if dy.dtype not in FLOAT_INPUT_DTYPES:
            dy = dy.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dX [T, K] = dY [T, N] @ W_g, W_g^T as [G, K, N] blocks
            dq, sd = per_token_cast_to_fp8(dy)
            dx = torch.empty(dy.shape[0], k, dtype=_gemm_out_dtype(ctx.x_dtype), device=dy.device)
            m_grouped_fp8_gemm_nt_contiguous((dq, sd), _transposed_blocks(wq, sw), dx, m_indices)
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # dW_g [N, K] = dY_g^T @ X_g, groups along the tokens
            dyt = grouped_transposed_per_token_cast_to_fp8(dy, ctx.sizes)
            dw = torch.empty(g, n, k, dtype=torch.float32, device=dy.device)
            k_grouped_fp8_gemm_nt_contiguous(dyt, (xtq, sxt), dw, ctx.sizes)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None


def grouped_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, num_tokens_per_group: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Per-expert linear layers in FP8 for tokens laid out contiguously by expert; differentiable.

    Args:
        x: [T, K] float32, bfloat16 or float16; rows [s_0 + .. + s_{g-1}, + s_g) belong to group g.
        weight: [G, N, K] master weights, one [N, K] matrix per group (float32 or bfloat16).
        num_tokens_per_group: the G sizes s_g (list of ints or a 1-D int tensor; zeros allowed).

    Returns:
        y [T, N] in x's dtype, y[rows of g] = x[rows of g] @ weight[g]^T.
    """
    _check_linear_args(x, weight, None, 3)
    check_dim("x", x, 2)
    sizes = _sizes("num_tokens_per_group", num_tokens_per_group, x.shape[0])
    if len(sizes) != weight.shape[0]:
        raise ValueError(f"num_tokens_per_group must have G={weight.shape[0]} entries, got {len(sizes)}")
    return _GroupedFP8Linear.apply(x.contiguous(), weight, sizes)
