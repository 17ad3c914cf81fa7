"""Eager PyTorch references for the kernels: the specification tests compare against.

Written with torch's own ops only (no ops._C), for clarity over speed. The cast reference follows
DeepSeek-V3's recipe (report, section 3.3): scale = max(amax, 1e-4) / 448 in fp32, payload =
e4m3(RNE(x / scale)) clamped to +-448; UE8M0 rounds the scale up to a power of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
MIN_AMAX = 1e-4


def round_up_pow2(sf: torch.Tensor) -> torch.Tensor:
    """The next power of two at or above each element (frexp: sf = m * 2**e, 0.5 <= m < 1)."""
    mantissa, exponent = torch.frexp(sf)
    exact = mantissa == 0.5
    out = torch.ldexp(torch.ones_like(sf), torch.where(exact, exponent - 1, exponent))
    return torch.where(torch.isfinite(sf), out, sf)


def quantize_tiles_reference(
    x: torch.Tensor, tile_rows: int, tile_cols: int, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes a 2-D tensor in tile_rows x tile_cols tiles; ragged edge tiles use their own amax.

    Returns (payload [M, K] float8_e4m3fn, scales [ceil(M/tile_rows), ceil(K/tile_cols)] float32).
    """
    m, k = x.shape
    tm, tk = -(-m // tile_rows), -(-k // tile_cols)
    padded = F.pad(x.float(), (0, tk * tile_cols - k, 0, tm * tile_rows - m))  # zeros never raise amax
    tiles = padded.view(tm, tile_rows, tk, tile_cols)  # [TM, tr, TK, tc]
    amax = tiles.abs().amax(dim=(1, 3))  # propagates NaN
    sf = amax.clamp(min=MIN_AMAX) / E4M3_MAX
    if use_ue8m0:
        sf = round_up_pow2(sf)
    q = (tiles / sf[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(tm * tile_rows, tk * tile_cols)[:m, :k].contiguous(), sf


def dequantize_tiles_reference(
    q: torch.Tensor, scales: torch.Tensor, tile_rows: int, tile_cols: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Inverse of quantize_tiles_reference: payload times its tile's scale, in ``dtype``."""
    m, k = q.shape
    full = scales.to(dtype).repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)
    return q.to(dtype) * full[:m, :k]
