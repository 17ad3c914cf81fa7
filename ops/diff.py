"""The accuracy metric used by every test and benchmark (DeepGEMM's form)."""

from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64; 0 for identical or empty inputs.

    Scale-aware and symmetric: about the squared relative error for close tensors. Unlike
    DeepEP's variant it does not add 1 to both tensors first, so it is strict near zero. NaN in
    either tensor gives NaN (a failed check, never a pass).
    """
    if x.shape != y.shape:
        raise ValueError(f"calc_diff: shapes differ, x {tuple(x.shape)} vs y {tuple(y.shape)}")
    if x.numel() == 0:
        return 0.0
    x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64).to(x.device)
    denom = (x64 * x64 + y64 * y64).sum()
    if denom == 0:
        return 0.0
    return float(1.0 - 2.0 * (x64 * y64).sum() / denom)
