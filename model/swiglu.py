"""SwiGLU experts as one autograd function over tokens laid out contiguously by expert:
y[rows of e] = w2_e(silu(w1_e x) * w3_e x), for the routed experts (E groups) and, with one group,
the dense FFN and the shared experts.

Why not plain autograd over `precision.linear` per expert: that allocates every expert's output
and concatenates them, stacks the E weight gradients into [E, ...] in backward (UnbindBackward),
adds the gate and up projections' input gradients in a separate pass, records an autograd node
per op, and, for BF16 GEMMs computed in FP32, upcasts the same tokens once per projection. Here
each expert's rows go through all steps before the next expert's (its operands stay in cache),
every result is written in place into one buffer (outputs, saved activations, each expert's
weight gradient), dX of the gate and up projections is one GEMM plus one accumulating GEMM
(addmm_), and each operand is upcast once. The elementwise steps are the torch ops autograd would
run (silu, mul, silu_backward) in the activations' dtype, so results differ from the plain
formulation only in how dX is summed (in BF16 it is rounded once instead of twice and added).

The gate and up GEMMs are NOT fused into one [2*inter, dim] GEMM: on the CPU measured (Zen 3,
debug preset shapes, 1 and 2 threads, 2026-11-29) the fused GEMM ran at the FLOP rate of the two
halves, so the weight copy it needs each step made the experts slower (0.87-0.92x in three of four
runs); a stored [E, 2*inter, dim] parameter would avoid the copy (not gain speed) but change HF and
checkpoint names, and the halves of a fused [N, 2*inter] activation are strided operands for the later GEMMs
(about 10% slower each).

BF16 GEMMs follow `model.precision`: on CPUs without BF16 matmul hardware they run in FP32 on
upcast operands and each GEMM's result is rounded to BF16 once, as `precision.linear` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from model.precision import bf16_matmul_upcast


def _gemm_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: float32 for BF16 operands on a CPU without BF16 matmul
    hardware (model.precision), the operands' own dtype otherwise."""
    if x.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in weights) and bf16_matmul_upcast(x.device):
        return torch.float32
    return x.dtype


def _segments(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every non-empty expert segment."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, operands already in the GEMM dtype; the result is rounded into out's dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


class _GroupedSwiGLU(torch.autograd.Function):
    """forward(x [N, dim], w1 [E, inter, dim], w2 [E, dim, inter], w3 [E, inter, dim], counts)
    -> [N, dim]. Saves x, the gate and up activations, silu(gate) and their product (what plain
    autograd would save), all in the activations' dtype. Each expert's rows go through all steps
    before the next expert's (its operands stay in cache)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int]) -> torch.Tensor:
        n, inter = x.shape[0], w1.shape[1]
        cd = _gemm_dtype(x, w1, w2, w3)
        segs = _segments(counts)
        gate = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, inter] each
        up, act, prod = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate)
        y = torch.empty_like(x)
        for e, s, t in segs:
            xe = x[s:t].to(cd)  # no copy unless upcasting
            _gemm(xe, w1[e].to(cd).t(), gate[s:t])
            _gemm(xe, w3[e].to(cd).t(), up[s:t])
            torch.ops.aten.silu.out(gate[s:t], out=act[s:t])
            torch.mul(act[s:t], up[s:t], out=prod[s:t])
            _gemm(prod[s:t].to(cd), w2[e].to(cd).t(), y[s:t])
        ctx.save_for_backward(x, w1, w2, w3, gate, up, act, prod)
        ctx.segs = segs
        return y

    @staticmethod
    @once_differentiable  # the backward writes into buffers (out=): no double backward
    def backward(ctx, gy: torch.Tensor):
        x, w1, w2, w3, gate, up, act, prod = ctx.saved_tensors
        segs = ctx.segs
        need_x, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:4]
        dt, cd = x.dtype, _gemm_dtype(x, w1, w2, w3)

        def weight_grad(w: torch.Tensor, needed: bool) -> torch.Tensor | None:  # experts without rows: zeros
            if not needed:
                return None
            return torch.zeros_like(w) if len(segs) < w.shape[0] else torch.empty_like(w)

        g_x = torch.empty_like(x) if need_x else None
        g_w1, g_w2, g_w3 = weight_grad(w1, need_w1), weight_grad(w2, need_w2), weight_grad(w3, need_w3)
        for e, s, t in segs:
            gye = gy[s:t].to(cd)
            if need_w2:
                _gemm(gye.t(), prod[s:t].to(cd), g_w2[e])
            if not (need_x or need_w1 or need_w3):
                continue
            g_prod = torch.mm(gye, w2[e].to(cd)).to(dt)
            g_up = (g_prod * act[s:t]).to(cd)
            g_gate = torch.ops.aten.silu_backward(g_prod * up[s:t], gate[s:t]).to(cd)
            if need_x:  # dX = d gate @ w1 + d up @ w3: one GEMM, one accumulating GEMM, one rounding
                if cd == dt:
                    torch.mm(g_gate, w1[e], out=g_x[s:t]).addmm_(g_up, w3[e])
                else:
                    g_x[s:t].copy_(torch.mm(g_gate, w1[e].to(cd)).addmm_(g_up, w3[e].to(cd)))
            if need_w1 or need_w3:
                xe = x[s:t].to(cd)
                if need_w1:
                    _gemm(g_gate.t(), xe, g_w1[e])
                if need_w3:
                    _gemm(g_up.t(), xe, g_w3[e])
        return g_x, g_w1, g_w2, g_w3, None


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """SwiGLU experts on tokens sorted by expert; differentiable in x and the three weights.

    Args:
        x: [N, dim] float32, float64 or bfloat16; rows [c_0 + .. + c_{e-1}, + c_e) belong to expert e.
        w1, w3: [E, inter, dim] gate and up projections; w2: [E, dim, inter] down projection (x's dtype).
        counts: E non-negative ints summing to N (zeros allowed).

    Returns:
        [N, dim] in x's dtype: w2_e(silu(w1_e x) * w3_e x) for each expert's rows.
    """
    counts = [int(c) for c in counts]
    e, inter, dim = w1.shape
    if w3.shape != w1.shape or w2.shape != (e, dim, inter):
        raise ValueError(f"w1/w3 must be [E, inter, dim] and w2 [E, dim, inter]; got {list(w1.shape)}, {list(w2.shape)}, {list(w3.shape)}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"x must be [N, {dim}], got {list(x.shape)}")
    if len(counts) != e or min(counts, default=0) < 0 or sum(counts) != x.shape[0]:
        raise ValueError(f"counts must be {e} non-negative ints summing to x's {x.shape[0]} rows, got {counts}")
    if any(w.dtype != x.dtype for w in (w1, w2, w3)):
        raise TypeError(f"x and the weights must share one dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}, {w3.dtype}")
    return _GroupedSwiGLU.apply(x.contiguous(), w1, w2, w3, counts)
