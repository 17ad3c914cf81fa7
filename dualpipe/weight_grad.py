"""Zero-bubble split of the backward: input gradients now (B), weight gradients later (W).

During a split B the executor enables ``WeightGradStore``; layers that support the split (like
``WeightGradLinear``) then compute only the input gradient and queue a closure that computes and
accumulates their weight gradients. ``flush`` closes the group of closures of one B; each W
action runs the oldest group (``pop``), FIFO, as the schedule's W order promises. Layers that do
not use the store compute everything during B, and their W is simply empty: always correct.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """Process-wide FIFO of deferred weight-gradient closures (one group per split backward)."""

    enabled: ClassVar[bool] = False
    cache: ClassVar[list[Callable[[], None]]] = []
    queue: ClassVar[deque[list[Callable[[], None]]]] = deque()

    @classmethod
    def put(cls, fn: Callable[[], None]) -> None:
        cls.cache.append(fn)

    @classmethod
    def flush(cls) -> None:
        cls.queue.append(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        if not cls.queue:
            raise RuntimeError("WeightGradStore.pop: no deferred weight gradients (a W without its split B)")
        for fn in cls.queue.popleft():
            fn()

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.queue = deque()

    @classmethod
    def pending(cls) -> int:
        return len(cls.queue)


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g.to(p.dtype)
    else:
        p.grad.add_(g)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)  # leaves: the deferred closure accumulates into their .grad
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        bias = ctx.has_bias

        def weight_grads() -> tuple[torch.Tensor, torch.Tensor | None]:
            go = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, out]
            gw = go.t() @ x.reshape(-1, x.shape[-1])  # [out, in]
            return gw, (go.sum(0) if bias else None)

        if WeightGradStore.enabled:
            params = ctx.params

            def deferred() -> None:
                gw, gb = weight_grads()
                _accumulate(params[0], gw)
                if gb is not None:
                    _accumulate(params[1], gb)

            WeightGradStore.put(deferred)
            return grad_x, None, None
        gw, gb = weight_grads()
        return grad_x, gw, gb


class WeightGradLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient is deferred to the W action under a split backward.

    Outside a split backward it behaves exactly like ``nn.Linear`` (gradients through autograd).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias)
