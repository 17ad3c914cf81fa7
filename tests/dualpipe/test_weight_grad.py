"""WeightGradLinear: the same gradients whether W runs inside B or is deferred to a W action."""

from __future__ import annotations

import pytest
import torch

import ops
from dualpipe import WeightGradLinear, WeightGradStore
from tests.harness.tensors import randn


def test_deferred_weight_gradients_equal_autograd() -> None:
    ref = torch.nn.Linear(16, 8, dtype=torch.float64)
    lin = WeightGradLinear(16, 8, dtype=torch.float64)
    lin.load_state_dict(ref.state_dict())
    x = randn(3, 5, 16, dtype=torch.float64).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    go = randn(3, 5, 8, dtype=torch.float64)
    ref(x_ref).backward(go)

    WeightGradStore.clear()
    WeightGradStore.enabled = True
    lin(x).backward(go)
    WeightGradStore.enabled = False
    WeightGradStore.flush()
    assert lin.weight.grad is None and lin.bias.grad is None  # deferred: nothing yet
    assert ops.calc_diff(x.grad, x_ref.grad) < 1e-14  # the input gradient is there already
    WeightGradStore.pop()
    assert ops.calc_diff(lin.weight.grad, ref.weight.grad) < 1e-14
    assert ops.calc_diff(lin.bias.grad, ref.bias.grad) < 1e-14
    # Outside a split backward it is a plain Linear; gradients accumulate.
    lin(x.detach()).backward(go)
    assert ops.calc_diff(lin.weight.grad, 2 * ref.weight.grad) < 1e-14


def test_pop_without_split_backward_raises() -> None:
    WeightGradStore.clear()
    with pytest.raises(RuntimeError, match="no deferred weight gradients"):
        WeightGradStore.pop()
