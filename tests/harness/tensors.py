"""Fresh random inputs and poisoned outputs, so no test passes on zeros or stale memory."""

from __future__ import annotations

import torch


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", scale: float = 1.0) -> torch.Tensor:
    """Normal random values (torch's global generator, seeded per test by conftest)."""
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def wide_range(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Random values whose magnitudes span 1e-8 to 1e4, with random signs: exercises subnormal
    FP8 payloads, the 1e-4 amax floor and saturation in one tensor."""
    mags = torch.exp(torch.empty(*shape).uniform_(-18.4, 9.2))
    signs = torch.randint(0, 2, shape).float() * 2 - 1
    return (mags * signs).to(dtype=dtype, device=device)


def poisoned(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """An output buffer a kernel must overwrite: NaN for floating dtypes, all-ones bytes otherwise."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.is_floating_point():
        return t.fill_(float("nan")) if t.element_size() > 1 else t.view(torch.uint8).fill_(0x7F).view(dtype)
    return t.view(torch.uint8).fill_(0xFF).view(dtype) if t.numel() else t


def assert_no_poison(t: torch.Tensor) -> None:
    """Every element was written: no NaN left in a floating output."""
    if t.is_floating_point():
        bad = torch.isnan(t.float()).sum().item()
        assert bad == 0, f"{bad} of {t.numel()} elements were never written (still NaN)"
