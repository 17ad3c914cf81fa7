"""FP8 mode pieces that are not plain linears: the routed experts' SwiGLU through the grouped
FP8 linear of `ops` (per-expert weights, tokens contiguous by expert; all three GEMMs in FP8,
DeepSeek-V3 report section 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu_fp8(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [N, dim] sorted by expert, w1/w3 [E, inter, dim], w2 [E, dim, inter], counts[e] rows per
    expert -> [N, dim] = w2_e(silu(w1_e x) * w3_e x) per expert segment.

    When inter is a multiple of 128 the gate and up projections are one grouped FP8 linear of
    [w1_e; w3_e]: x is quantized once (and transposed-quantized once for Wgrad) instead of twice,
    and since no 128x128 weight block or 1x128 gradient tile straddles the two halves, every FP8
    value is the one the two separate linears would use (only dX's FP32 sum is ordered
    differently). Otherwise a shared block would change the quantization: two linears."""
    from ops import grouped_fp8_linear
    from ops.gemm import BLOCK  # 128x128 weight blocks, 1x128 activation and gradient tiles

    if x.dtype == torch.float64:
        raise TypeError("FP8 mode needs a float32 or bfloat16 model (dtype), not float64")
    inter = w1.shape[1]
    if inter % BLOCK == 0:
        gate, up = grouped_fp8_linear(x, torch.cat([w1, w3], dim=1), counts).split(inter, dim=1)  # [N, inter] each
    else:
        gate, up = grouped_fp8_linear(x, w1, counts), grouped_fp8_linear(x, w3, counts)
    return grouped_fp8_linear(F.silu(gate) * up, w2, counts)
