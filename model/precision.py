"""BF16 GEMMs on CPUs without BF16 matmul hardware.

A BF16 tensor core (or AVX512_BF16 / AMX_BF16) multiplies BF16 values exactly and accumulates in
FP32. CPUs without those instructions (for example AMD Zen 3: AVX2/FMA only) run torch's BF16
matmul at a few GFLOP/s, far below their FP32 rate (measured here: <1 to ~19 GFLOP/s against
~130). So on such CPUs the model's BF16 GEMMs upcast their operands to FP32 (exact: a BF16 value is
an FP32 value with a shorter mantissa), multiply in FP32 and round the result to BF16 once: the
arithmetic of a BF16 tensor core, at the FP32 rate. Parameters and activations stay BF16 in memory.

The choice is made at run time by `bf16_matmul_upcast(device)`: never on CUDA; on a CPU, upcast
unless it has AVX512_BF16 or AMX_BF16. Force it with the environment variable DSV3_BF16_MATMUL
(`upcast` or `native`; `auto` = the default) or, in code and tests, `set_bf16_matmul(mode)`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "DSV3_BF16_MATMUL"
MODES = ("auto", "upcast", "native")
_mode: str | None = None  # set_bf16_matmul's override; None: read ENV_VAR


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has BF16 dot-product instructions (AVX512_BF16 or AMX_BF16) that torch's
    BF16 matmul uses (cpuinfo through torch.cpu.get_capabilities)."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16", False) or caps.get("amx_bf16", False))


def set_bf16_matmul(mode: str | None) -> None:
    """Overrides the choice: 'upcast', 'native', 'auto'; None returns to the environment variable."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"bf16 matmul mode must be one of {MODES} or None, got {mode!r}")
    _mode = mode


def bf16_matmul_mode() -> str:
    """The mode in force: set_bf16_matmul's, else DSV3_BF16_MATMUL's, else 'auto'."""
    mode = _mode if _mode is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {mode!r}")
    return mode


def bf16_matmul_upcast(device: torch.device) -> bool:
    """Whether BF16 GEMMs on `device` run as FP32 GEMMs of the upcast operands (see module doc)."""
    if device.type != "cpu":
        return False
    mode = bf16_matmul_mode()
    if mode == "auto":
        return not cpu_has_bf16_matmul()
    return mode == "upcast"


class _UpcastLinear(torch.autograd.Function):
    """y = bf16(fp32(x) @ fp32(w)^T), and the two backward GEMMs the same way. Saves the BF16
    operands (not FP32 copies) for backward, so activation memory stays that of a BF16 model."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        gy32 = gy.float()
        gx = gy32.matmul(w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = gy32.reshape(-1, gy32.size(-1)).t().matmul(x.reshape(-1, x.size(-1)).float()).to(w.dtype)
        return gx, gw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias; BF16 x BF16 on a CPU without BF16 matmul hardware is
    computed in FP32 and rounded to BF16 (bf16_matmul_upcast)."""
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and bf16_matmul_upcast(x.device):
        return _UpcastLinear.apply(x, weight)
    return F.linear(x, weight)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float) -> torch.Tensor:
    """scaled_dot_product_attention; BF16 inputs on a CPU without BF16 matmul hardware attend in
    FP32 (the attention core's GEMMs are BF16 GEMMs too) and the output is rounded to BF16."""
    if q.dtype == torch.bfloat16 and bf16_matmul_upcast(q.device):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal, scale=scale)
        return out.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


class Linear(nn.Linear):
    """`nn.Linear` whose GEMM goes through `linear` (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias
