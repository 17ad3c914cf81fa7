"""FP8 mode pieces that are not plain linears: the routed experts' SwiGLU through the grouped
FP8 linear of `ops` (per-expert weights, tokens contiguous by expert; all three GEMMs in FP8,
DeepSeek-V3 report section 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu_fp8(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [N, dim] sorted by expert, w1/w3 [E, inter, dim], w2 [E, dim, inter], counts[e] rows per
    expert -> [N, dim] = w2_e(silu(w1_e x) * w3_e x) per expert segment."""
    from ops import grouped_fp8_linear

    if x.dtype == torch.float64:
        raise TypeError("FP8 mode needs a float32 or bfloat16 model (dtype), not float64")
    h = F.silu(grouped_fp8_linear(x, w1, counts)) * grouped_fp8_linear(x, w3, counts)
    return grouped_fp8_linear(h, w2, counts)
