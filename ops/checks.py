"""Argument checks shared by the Python faces of the kernels.

Every public op validates its inputs here, before any native code runs, and raises an exception
that names the argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")


def check_dim(name: str, t: torch.Tensor, dims: int | tuple[int, ...]) -> None:
    dims = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in dims:
        expected = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {expected} dimensions, got shape {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major); call .contiguous() first, got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    unique = set(devices.values())
    if len(unique) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise RuntimeError(f"all tensors must be on one device, got {listing}")
    return next(iter(unique))


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
