"""FP8 (E4M3) quantization as DeepSeek-V3 trains: 1x128 tiles for activations, 128x128 blocks
for weights, and 1x128 tiles along the token dimension for the weight-gradient GEMM.

Arithmetic (identical on CPU and CUDA, bit for bit): scale = fp32(max(amax, 1e-4)) / 448 with
IEEE division; with ``use_ue8m0`` the scale is rounded up to a power of two; payload =
e4m3(RNE(fp32(x) / scale)) clamped to +-448. A ragged last tile is quantized on its own amax.
Dequantize by MULTIPLYING the payload by its scale.

Non-finite inputs: a tile that holds NaN gets a NaN scale and a tile that holds +-Inf an Inf
scale, so the whole tile dequantizes to NaN (the problem stays visible; it is never clipped
into plausible numbers). Payload NaN is always the byte 0x7F. Other tiles are unaffected.

Empty inputs give empty outputs of the documented shapes.
"""

from __future__ import annotations

import math

import torch

from ops._native import built_with_cuda, native
from ops.checks import FLOAT_INPUT_DTYPES, check_contiguous, check_dim, check_dtype, check_positive_int, check_tensor

__all__ = ["per_block_cast_to_fp8", "per_token_cast_to_fp8", "transposed_per_token_cast_to_fp8"]


def _check_cast_input(name: str, x: object, dims: int | tuple[int, ...]) -> torch.Tensor:
    x = check_tensor(name, x)
    check_dtype(name, x, FLOAT_INPUT_DTYPES)
    check_dim(name, x, dims)
    check_contiguous(name, x)
    if x.device.type == "cuda" and not built_with_cuda():
        raise RuntimeError(f"{name} is on {x.device} but ops._C was built without CUDA kernels")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name} must be on a CPU or CUDA device, got {x.device}")
    return x


def per_token_cast_to_fp8(
    x: torch.Tensor, group_size: int = 128, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes activations in 1 x group_size tiles (one scale per token and 128 channels).

    Args:
        x: [..., K] float32, bfloat16 or float16, contiguous; leading dimensions are tokens.
        group_size: channels per scale (128 in DeepSeek-V3).
        use_ue8m0: round each scale up to a power of two.

    Returns:
        (x_fp8 [..., K] float8_e4m3fn, scales [..., ceil(K / group_size)] float32).
    """
    x = _check_cast_input("x", x, tuple(range(1, 9)))
    check_positive_int("group_size", group_size)
    lead, k = x.shape[:-1], x.shape[-1]
    q, sf = native.cast_to_fp8_tiles(x.reshape(math.prod(lead), k), 1, group_size, bool(use_ue8m0))
    return q.view(*lead, k), sf.view(*lead, sf.shape[-1])


def per_block_cast_to_fp8(
    w: torch.Tensor, block_size: int = 128, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes a weight matrix in block_size x block_size blocks.

    Args:
        w: [N, K] float32, bfloat16 or float16, contiguous.

    Returns:
        (w_fp8 [N, K] float8_e4m3fn, scales [ceil(N / block_size), ceil(K / block_size)] float32).
    """
    w = _check_cast_input("w", w, 2)
    check_positive_int("block_size", block_size)
    return native.cast_to_fp8_tiles(w, block_size, block_size, bool(use_ue8m0))


def transposed_per_token_cast_to_fp8(
    x: torch.Tensor, group_size: int = 128, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes X^T in 1 x group_size tiles, i.e. group_size x 1 tiles of X along the tokens.

    The weight-gradient GEMM (dW = dY^T X) reduces over tokens, so both operands need their
    scales along the token dimension; this reads X [M, K] once and writes X^T directly.

    Args:
        x: [..., K] float32, bfloat16 or float16, contiguous; leading dimensions are M tokens.

    Returns:
        (xt_fp8 [K, M] float8_e4m3fn row-major, scales [K, ceil(M / group_size)] float32).
    """
    x = _check_cast_input("x", x, tuple(range(1, 9)))
    check_positive_int("group_size", group_size)
    return native.cast_to_fp8_transposed(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), group_size, bool(use_ue8m0))


@torch.library.register_fake("dsv3::cast_to_fp8_tiles")
def _cast_to_fp8_tiles_fake(x: torch.Tensor, tile_rows: int, tile_cols: int, use_ue8m0: bool):
    m, k = x.shape
    scales = x.new_empty((-(-m // tile_rows), -(-k // tile_cols)), dtype=torch.float32)
    return x.new_empty((m, k), dtype=torch.float8_e4m3fn), scales


@torch.library.register_fake("dsv3::cast_to_fp8_transposed")
def _cast_to_fp8_transposed_fake(x: torch.Tensor, group_size: int, use_ue8m0: bool):
    m, k = x.shape
    return x.new_empty((k, m), dtype=torch.float8_e4m3fn), x.new_empty((k, -(-m // group_size)), dtype=torch.float32)
