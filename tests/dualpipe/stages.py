"""Stage modules and a single-process reference shared by the dualpipe tests (run in gloo ranks)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

import dualpipe
from dualpipe import WeightGradLinear

DIM = 8


class Stage(nn.Module):
    """x + tanh(W x + b): a saved output (tanh) and a residual, like a transformer block."""

    def __init__(self, dim: int = DIM, split_weights: bool = False):
        super().__init__()
        self.lin = (WeightGradLinear if split_weights else nn.Linear)(dim, dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class HookStage(Stage):
    """A stage whose class defines the overlap hook; records each call on the instance."""

    calls: ClassVar[list[str]] = []

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1):
        cls.calls.append(f"F{module0.stage_id}&B{module1.stage_id}")
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:
            dualpipe.run_backward(outputs1, output_grads1)
        return outputs0, loss0


def make_stages(seed: int, num_stages: int, cls: type[Stage] = Stage, **kw) -> list[Stage]:
    """The same stages on every rank: built from ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    stages = [cls(**kw) for _ in range(num_stages)]
    for i, s in enumerate(stages):
        s.stage_id = i
    torch.random.set_rng_state(gen_state)
    return stages


def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def reference(stages: list[Stage], xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Runs the micro-batches through the stages in sequence; returns per-chunk losses and each
    stage's parameter gradients of the summed loss (on fresh copies: the pipeline's stages are
    left untouched)."""
    import copy

    ref = [copy.deepcopy(s) for s in stages]
    losses = []
    for x, y in zip(xs, ys, strict=True):
        h = x
        for s in ref:
            h = s(h)
        loss = criterion(h, y)
        loss.backward()
        losses.append(loss.detach())
    return losses, [[p.grad.clone() for p in s.parameters()] for s in ref]


def reference_outputs(stages: list[Stage], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for x in xs:
            h = x
            for s in stages:
                h = s(h)
            outs.append(h)
    return outs
