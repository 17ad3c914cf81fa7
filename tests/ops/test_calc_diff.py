"""calc_diff: DeepGEMM's metric, 1 - 2*sum(xy)/sum(x^2+y^2) in float64."""

from __future__ import annotations

import math

import pytest
import torch

from ops import calc_diff


def test_identical_tensors_give_zero() -> None:
    x = torch.randn(100, 37)
    assert calc_diff(x, x.clone()) == pytest.approx(0.0, abs=1e-15)


def test_matches_the_formula_in_float64() -> None:
    x, y = torch.randn(64, 64), torch.randn(64, 64)
    x64, y64 = x.double(), y.double()
    expected = 1 - 2 * (x64 * y64).sum().item() / (x64 * x64 + y64 * y64).sum().item()
    assert calc_diff(x, y) == pytest.approx(expected, rel=1e-12)


def test_small_relative_error_is_about_its_square_over_two() -> None:
    x = torch.randn(10000, dtype=torch.float64)
    eps = 1e-3
    assert calc_diff(x, x * (1 + eps)) == pytest.approx(eps * eps / 2, rel=1e-2)


def test_opposite_tensors_give_two_and_empty_gives_zero() -> None:
    x = torch.randn(5, 5)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(torch.empty(0), torch.empty(0)) == 0.0


def test_nan_never_passes() -> None:
    x = torch.randn(8)
    y = x.clone()
    y[3] = float("nan")
    assert math.isnan(calc_diff(x, y))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        calc_diff(torch.randn(2, 3), torch.randn(3, 2))
