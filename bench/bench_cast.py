"""FP8 cast kernels against an eager-PyTorch implementation of the same quantization.

Target (foundation issue): the CPU per-token cast at least 4x faster than eager PyTorch on a
4096 x 7168 bf16 tensor.
"""

from __future__ import annotations

import pytest
import torch

import ops
from ops.reference import quantize_tiles_reference

SHAPES = [pytest.param((4096, 7168), marks=pytest.mark.quick), (1024, 2048)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["ours", "eager"])
def test_per_token_cast(benchmark, shape: tuple[int, int], impl: str) -> None:
    x = torch.randn(*shape, dtype=torch.bfloat16)
    benchmark.group = f"per_token_cast {shape[0]}x{shape[1]} bf16 cpu"
    benchmark.extra_info.update(role="ours" if impl == "ours" else "peer", work=x.numel() * 3, unit="B")
    if impl == "ours":
        q, s = benchmark(ops.per_token_cast_to_fp8, x)
    else:
        q, s = benchmark(quantize_tiles_reference, x, 1, 128)
    assert q.shape == x.shape and s.shape == (shape[0], shape[1] // 128)


@pytest.mark.parametrize("impl", ["ours", "eager"])
def test_per_block_cast(benchmark, impl: str) -> None:
    w = torch.randn(7168, 2048, dtype=torch.bfloat16)
    benchmark.group = "per_block_cast 7168x2048 bf16 cpu"
    benchmark.extra_info.update(role="ours" if impl == "ours" else "peer", work=w.numel() * 3, unit="B")
    fn = ops.per_block_cast_to_fp8 if impl == "ours" else (lambda t: quantize_tiles_reference(t, 128, 128))
    benchmark(fn, w)


def _synced(fn, *args):
    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["ours", "eager"])
def test_per_token_cast_cuda(benchmark, impl: str) -> None:
    x = torch.randn(8192, 7168, dtype=torch.bfloat16, device="cuda")
    benchmark.group = "per_token_cast 8192x7168 bf16 cuda"
    benchmark.extra_info.update(role="ours" if impl == "ours" else "peer", work=x.numel() * 3, unit="B")
    fn = ops.per_token_cast_to_fp8 if impl == "ours" else (lambda t: quantize_tiles_reference(t, 1, 128))
    benchmark(_synced(fn, x))
