"""model/swiglu.py: the grouped SwiGLU autograd function (routed experts, shared experts, dense
FFN) against the plain per-expert formulation autograd differentiates, in float64 (differences
are summation order only) and in BF16 (both GEMM modes of model/precision.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, precision
from model.layers import MLP
from model.swiglu import grouped_swiglu
from ops import calc_diff
from tests.harness.tensors import randn


def _plain(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The unfused formulation: per expert, w2(silu(w1 x) * w3 x) through precision.linear."""
    outs = [precision.linear(F.silu(precision.linear(xe, w1[e])) * precision.linear(xe, w3[e]), w2[e])
            for e, xe in enumerate(torch.split(x, counts))]
    return torch.cat(outs)


def _counts(n_experts: int, empty: int) -> list[int]:
    """Random segment sizes (1..40 rows) with `empty` randomly chosen experts receiving none."""
    counts = torch.randint(1, 41, (n_experts,))
    counts[torch.randperm(n_experts)[:empty]] = 0
    return counts.tolist()


def _weights(n_experts: int, inter: int, dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [randn(n_experts, inter, dim, dtype=dtype, scale=0.1), randn(n_experts, dim, inter, dtype=dtype, scale=0.1),
            randn(n_experts, inter, dim, dtype=dtype, scale=0.1)]


def _run(fn, x: torch.Tensor, ws: list[torch.Tensor], counts: list[int], gy: torch.Tensor, needs: tuple[bool, ...]):
    """(output, grad of x, grads of w1, w2, w3) of fn on fresh leaves; None where not required."""
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip([x, *ws], needs, strict=True)]
    y = fn(leaves[0], *leaves[1:], counts)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.fixture
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer torch.empty/empty_like allocates during the test starts NaN-filled, so a row
    or an expert's gradient the function forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


@pytest.mark.parametrize("empty", [0, 2])
def test_outputs_and_gradients_equal_the_plain_formulation_in_float64(empty: int, poisoned_buffers: None) -> None:
    n_experts, inter, dim = 6, 24, 16
    counts = _counts(n_experts, empty)
    x = randn(sum(counts), dim, dtype=torch.float64)
    ws = _weights(n_experts, inter, dim, torch.float64)
    gy = randn(sum(counts), dim, dtype=torch.float64)
    got = _run(grouped_swiglu, x, ws, counts, gy, (True,) * 4)
    ref = _run(_plain, x, ws, counts, gy, (True,) * 4)
    for name, g, r in zip(["y", "x", "w1", "w2", "w3"], got, ref, strict=True):
        assert torch.isfinite(g).all(), name  # every row and every expert's gradient written
        assert calc_diff(g, r) < 1e-12, name
    for e in range(n_experts):  # an expert without tokens gets an exact zero gradient
        if counts[e] == 0:
            assert all(torch.equal(g[e], torch.zeros_like(g[e])) for g in got[2:])


def test_only_the_requested_gradients_are_computed() -> None:
    counts = _counts(4, 1)
    x = randn(sum(counts), 16, dtype=torch.float64)
    ws = _weights(4, 8, 16, torch.float64)
    gy = randn(sum(counts), 16, dtype=torch.float64)
    for needs in [(False, True, True, True), (True, False, False, False), (True, True, False, True), (False, False, True, False)]:
        got = _run(grouped_swiglu, x, ws, counts, gy, needs)
        ref = _run(_plain, x, ws, counts, gy, (True,) * 4)
        for need, g, r in zip(needs, got[1:], ref[1:], strict=True):
            assert (g is None) if not need else calc_diff(g, r) < 1e-12


def test_no_tokens_at_all_gives_an_empty_output_and_zero_weight_gradients() -> None:
    ws = [w.requires_grad_() for w in _weights(3, 8, 16, torch.float32)]
    x = randn(0, 16).requires_grad_()
    y = grouped_swiglu(x, *ws, [0, 0, 0])
    assert y.shape == (0, 16)
    (y.sum() + sum(w.sum() for w in ws) * 0).backward()
    assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in ws)


@pytest.fixture(params=["upcast", "native"])
def bf16_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    precision.set_bf16_matmul(request.param)
    yield request.param
    precision.set_bf16_matmul(None)


def test_bf16_matches_the_plain_formulation_and_float64(bf16_mode: str) -> None:
    """Same GEMMs, same roundings as the plain BF16 formulation, except dX (rounded once here,
    twice and added there); both within BF16 rounding of the float64 result."""
    counts = _counts(5, 1)
    x = randn(sum(counts), 64, dtype=torch.bfloat16)
    ws = _weights(5, 96, 64, torch.bfloat16)
    gy = randn(sum(counts), 64, dtype=torch.bfloat16)
    got = _run(grouped_swiglu, x, ws, counts, gy, (True,) * 4)
    plain = _run(_plain, x, ws, counts, gy, (True,) * 4)
    ref = _run(_plain, x.double(), [w.double() for w in ws], counts, gy.double(), (True,) * 4)
    for name, g, p, r in zip(["y", "x", "w1", "w2", "w3"], got, plain, ref, strict=True):
        assert g.dtype == torch.bfloat16, name
        if name != "x":  # the same operations in the same order
            assert calc_diff(g, p) < 1e-9, name
        # a SwiGLU chain rounds every intermediate to BF16 (tests/model/test_precision.py: 2e-5)
        assert calc_diff(g, r) < 2e-5 and calc_diff(p, r) < 2e-5, name


def test_dense_mlp_equals_its_plain_formula_in_float64() -> None:
    """MLP (dense FFN, shared experts) runs the grouped function with one group."""
    args = ModelArgs.preset("tiny", dtype="float64")
    mlp = MLP(args.dim, args.inter_dim, args)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = randn(2, 7, args.dim, dtype=torch.float64, scale=1.0).requires_grad_()
    y = mlp(x)
    gy = randn(*y.shape, dtype=torch.float64)
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_()
    w = {n: p.detach().clone().requires_grad_() for n, p in mlp.named_parameters()}
    y2 = F.linear(F.silu(F.linear(x2, w["w1.weight"])) * F.linear(x2, w["w3.weight"]), w["w2.weight"])
    y2.backward(gy)
    assert y.shape == x.shape
    assert calc_diff(y, y2) < 1e-12 and calc_diff(x.grad, x2.grad) < 1e-12
    for n, p in mlp.named_parameters():
        assert calc_diff(p.grad, w[n].grad) < 1e-12, n


def test_bad_arguments_raise_naming_them() -> None:
    ws = _weights(2, 8, 16, torch.float32)
    x = randn(5, 16)
    with pytest.raises(ValueError, match="counts"):
        grouped_swiglu(x, *ws, [2, 2])
    with pytest.raises(ValueError, match="counts"):
        grouped_swiglu(x, *ws, [5])
    with pytest.raises(ValueError, match="x must be"):
        grouped_swiglu(randn(5, 8), *ws, [2, 3])
    with pytest.raises(ValueError, match="w2"):
        grouped_swiglu(x, ws[0], ws[0], ws[2], [2, 3])
    with pytest.raises(TypeError, match="dtype"):
        grouped_swiglu(x.double(), *ws, [2, 3])


def test_double_backward_is_refused() -> None:
    ws = [w.requires_grad_() for w in _weights(2, 8, 16, torch.float64)]
    x = randn(5, 16, dtype=torch.float64).requires_grad_()
    (gx,) = torch.autograd.grad(grouped_swiglu(x, *ws, [2, 3]).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        gx.sum().backward()
