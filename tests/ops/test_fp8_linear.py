"""fp8_linear and grouped_fp8_linear (ops/linear.py): outputs and gradients against float64
autograd on the unquantized tensors, and a tiny MLP trained in FP8 against the same in BF16."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import ops

TOL = 1e-3  # issue 3: FP8 linear within calc_diff 1e-3 of float64


def float64_reference(x, weight, bias, dy):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    y = F.linear(x64, w64, b64)
    y.backward(dy.double())
    return y, x64.grad, w64.grad, (b64.grad if b64 is not None else None)


@pytest.mark.parametrize(
    "lead,n,k,w_dtype,with_bias",
    [
        ((300,), 200, 576, torch.float32, True),
        ((2, 65), 128, 256, torch.bfloat16, False),
        ((129,), 64, 100, torch.float32, True),
        ((1,), 130, 384, torch.bfloat16, True),
    ],
)
def test_fp8_linear_output_and_gradients_match_float64(lead, n, k, w_dtype, with_bias) -> None:
    x = torch.randn(*lead, k, requires_grad=True)
    weight = (torch.randn(n, k) / k**0.5).to(w_dtype).requires_grad_()
    bias = torch.randn(n).to(w_dtype).requires_grad_() if with_bias else None
    y = ops.fp8_linear(x, weight, bias)
    assert y.shape == (*lead, n) and y.dtype == x.dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, dw64, db64 = float64_reference(x, weight, bias, dy)
    assert ops.calc_diff(y, y64) < TOL
    assert ops.calc_diff(x.grad, dx64) < TOL
    assert weight.grad.dtype == w_dtype and ops.calc_diff(weight.grad, dw64) < TOL
    if with_bias:
        assert bias.grad.dtype == w_dtype and ops.calc_diff(bias.grad, db64) < TOL


def test_fp8_linear_bf16_activations_and_frozen_weight() -> None:
    x = torch.randn(70, 256, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(96, 256) / 16
    y = ops.fp8_linear(x, weight)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, _, _ = float64_reference(x, weight, None, dy)
    assert ops.calc_diff(y, y64) < TOL and ops.calc_diff(x.grad, dx64) < TOL


def test_fp8_linear_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="x must be"):
        ops.fp8_linear(torch.randn(4, 10), torch.randn(3, 11))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.fp8_linear(torch.randn(4, 10), torch.randn(3, 10), torch.randn(4))
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.fp8_linear(torch.randn(4, 10), torch.ones(3, 10, dtype=torch.int32))


@pytest.mark.parametrize("sizes", [[0, 37, 130, 0, 5], [200]])
def test_grouped_fp8_linear_matches_per_group_float64(sizes: list[int]) -> None:
    g, n, k = len(sizes), 96, 320
    x = torch.randn(sum(sizes), k, requires_grad=True)
    weight = (torch.randn(g, n, k) / k**0.5).requires_grad_()
    y = ops.grouped_fp8_linear(x, weight, sizes)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y64 = torch.cat([xs @ w64[e].T for e, xs in enumerate(x64.split(sizes))])
    y64.backward(dy.double())
    assert ops.calc_diff(y, y64) < TOL
    assert ops.calc_diff(x.grad, x64.grad) < TOL
    assert ops.calc_diff(weight.grad, w64.grad) < TOL
    for e, s in enumerate(sizes):
        if s == 0:  # an expert without tokens gets an exactly zero gradient
            assert (weight.grad[e] == 0).all()


class TinyMLP(torch.nn.Module):
    def __init__(self, dims: list[int], fp8: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in itertools.pairwise(dims))
        self.fp8 = fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if self.fp8:
                x = ops.fp8_linear(x, layer.weight, layer.bias)
            else:  # BF16 compute, FP32 master weights
                x = F.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def test_tiny_mlp_trained_in_fp8_matches_bf16_loss() -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    dims, batch, steps = [64, 128, 10], 256, 200
    # A noisy classification task: labels sampled from a random teacher's softmax and a fresh
    # batch every step (the same batches for both runs), so the loss floor is set by the data's
    # entropy, not by memorisation or by the arithmetic.
    teacher = torch.randn(dims[0], dims[-1]) / dims[0] ** 0.5 * 2
    data = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(batch, dims[0], generator=data)
        batches.append((x, torch.multinomial(torch.softmax(x @ teacher, -1), 1, generator=data)[:, 0]))

    def train(fp8: bool) -> tuple[float, float]:
        torch.manual_seed(seed)
        model = TinyMLP(dims, fp8)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for x, labels in batches:
            loss = F.cross_entropy(model(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[-20:]) / 20, sum(losses[:5]) / 5

    (fp8_loss, fp8_first), (bf16_loss, _bf16_first) = train(True), train(False)
    assert fp8_loss < 0.8 * fp8_first, (fp8_first, fp8_loss)  # it trained
    assert abs(fp8_loss - bf16_loss) / bf16_loss < 0.01, (fp8_loss, bf16_loss)
