"""Small building blocks shared by attention, MoE and MTP: RMSNorm, the linear-layer factory
(BF16/FP32 `model.precision.Linear` or the FP8 linear of the DeepSeek-V3 recipe) and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.precision import Linear
from model.swiglu import grouped_swiglu


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 (float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(work)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(work)).to(x.dtype)


class FP8Linear(nn.Linear):
    """A bias-free linear whose three GEMMs (Fprop, Dgrad, Wgrad) run in FP8 through
    `ops.fp8_linear` (1x128 activation tiles, 128x128 weight blocks; DeepSeek-V3 report 3.3).
    The master weight and its gradient stay in the parameter's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ops import fp8_linear  # imported late: the FP8 GEMM package is optional for BF16 use

        return fp8_linear(x, self.weight)


def make_linear(in_features: int, out_features: int, args: ModelArgs, *, fp8_allowed: bool = True) -> nn.Linear:
    """The one switch between precisions: every linear of MLA, MoE and dense FFN is built here.
    `fp8_allowed=False` keeps a layer out of FP8 (the recipe keeps embedding, head and router high
    precision; those are not built through this factory at all)."""
    cls = FP8Linear if (args.fp8 and fp8_allowed) else Linear
    return cls(in_features, out_features, bias=False, dtype=args.torch_dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). The dense FFN of the first layers and the
    shared experts (which are one MLP of width n_shared_experts * moe_inter_dim)."""

    def __init__(self, dim: int, inter_dim: int, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = make_linear(dim, inter_dim, args)
        self.w2 = make_linear(inter_dim, dim, args)
        self.w3 = make_linear(dim, inter_dim, args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.w1, FP8Linear):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # BF16/FP32: the grouped SwiGLU with one group (one autograd node, x upcast once for BF16)
        rows = x.reshape(-1, x.shape[-1])
        y = grouped_swiglu(rows, self.w1.weight[None], self.w2.weight[None], self.w3.weight[None], [rows.shape[0]])
        return y.view(x.shape)
