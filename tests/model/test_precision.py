"""BF16 GEMMs computed in FP32 on CPUs without BF16 matmul hardware (model/precision.py): the
run-time choice, and outputs and gradients of both choices against float64 references."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from model import ModelArgs, Transformer, precision
from model.moe import MoE
from ops import calc_diff
from tests.harness.tensors import randn

# One BF16 rounding of every element (relative error up to 2^-9) gives calc_diff ~ rms(rel err)^2/2,
# measured 1.4e-6; a GEMM whose inputs are already BF16 adds nothing else when it accumulates in
# FP32. Chains (SwiGLU, a whole model) round every intermediate, so their bounds are looser
# (measured: experts 1.2e-5, dense model logits 2e-5, its gradients up to 1e-4); each bound is a few times the measurement.
ONE_ROUNDING = 5e-6


@pytest.fixture(params=["upcast", "native"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    precision.set_bf16_matmul(request.param)
    yield request.param
    precision.set_bf16_matmul(None)


def test_choice_follows_cpu_then_environment_then_override(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    assert precision.bf16_matmul_upcast(cpu) == (not precision.cpu_has_bf16_matmul())
    monkeypatch.setenv(precision.ENV_VAR, "native")
    assert not precision.bf16_matmul_upcast(cpu)
    monkeypatch.setenv(precision.ENV_VAR, "upcast")
    assert precision.bf16_matmul_upcast(cpu)
    try:
        precision.set_bf16_matmul("native")  # the override wins over the environment
        assert not precision.bf16_matmul_upcast(cpu)
        precision.set_bf16_matmul("upcast")
        assert not precision.bf16_matmul_upcast(torch.device("cuda"))  # never on GPUs
    finally:
        precision.set_bf16_matmul(None)
    monkeypatch.setenv(precision.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=precision.ENV_VAR):
        precision.bf16_matmul_upcast(cpu)
    with pytest.raises(ValueError, match="bf16 matmul mode"):
        precision.set_bf16_matmul("fp32")


def _linear_case(mode: str, shape: tuple[int, ...], n: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(out, grad_x, grad_w) of precision.linear on BF16 inputs, their float64 references, and the
    same products of the operands' absolute values (which bound any accumulation error)."""
    x = randn(*shape, dtype=torch.bfloat16).requires_grad_()
    w = randn(n, shape[-1], dtype=torch.bfloat16, scale=0.1).requires_grad_()
    gy = randn(*shape[:-1], n, dtype=torch.bfloat16)
    out = precision.linear(x, w)
    out.backward(gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.linear(x64, w64)
    ref.backward(gy.double())
    ax, aw, ag = x64.detach().abs(), w64.detach().abs(), gy.double().abs()
    absolute = [ax @ aw.t(), ag @ aw, ag.reshape(-1, n).t() @ ax.reshape(-1, shape[-1])]
    return [out, x.grad, w.grad], [ref, x64.grad, w64.grad], absolute


@pytest.mark.parametrize("shape", [(96, 256), (2, 40, 136)])
def test_linear_and_its_gradients_match_float64(mode: str, shape: tuple[int, ...]) -> None:
    got, ref, _ = _linear_case(mode, shape, 72)
    for name, g, r in zip(["out", "grad_x", "grad_w"], got, ref, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape, name
        assert calc_diff(g, r) < ONE_ROUNDING, (name, calc_diff(g, r))


def test_upcast_is_one_rounding_of_an_fp32_product() -> None:
    """What a BF16 tensor core returns: the exact product accumulated in FP32, rounded once. So
    almost every element equals the float64 result rounded to BF16, and every element is within one
    BF16 step plus the FP32 accumulation bound K * 2^-24 * sum|a||b| (which matters only where the
    sum cancels to near zero). A BF16 accumulation would break both."""
    precision.set_bf16_matmul("upcast")
    try:
        got, ref, absolute = _linear_case("upcast", (128, 512), 96)
    finally:
        precision.set_bf16_matmul(None)
    for name, g, r, a, k in zip(["out", "grad_x", "grad_w"], got, ref, absolute, [512, 96, 128], strict=True):
        rounded = r.to(torch.bfloat16)
        assert (g == rounded).float().mean() > 0.99, name
        bound = r.abs() * 2.0**-7 + k * 2.0**-24 * a  # one BF16 ulp (<= |r| 2^-7) + FP32 accumulation
        assert ((g.double() - r).abs() <= bound).all(), name


def _moe_pair() -> tuple[MoE, MoE]:
    args = ModelArgs.preset("tiny", dtype="bfloat16")
    moe = MoE(args)
    for p in moe.parameters():
        with torch.no_grad():
            p.normal_(0, 0.05)
    ref = MoE(args.replace(dtype="float64"))
    ref.load_state_dict({k: v.double() for k, v in moe.state_dict().items()})
    return moe, ref


def test_routed_and_shared_experts_match_float64(mode: str) -> None:
    """The grouped expert GEMMs and the shared experts, for a given routing (so no near-tie
    routing flip can make BF16 and float64 choose differently)."""
    moe, ref = _moe_pair()
    t, k, n_exp = 64, moe.topk, moe.n_experts
    x = randn(t, moe.args.dim, dtype=torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(n_exp)[:k] for _ in range(t)])
    weights = torch.rand(t, k)
    xb, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    out = moe.routed_local(xb, weights, topk_idx) + moe.shared_experts(xb)
    out_ref = ref.routed_local(x64, weights.double(), topk_idx) + ref.shared_experts(x64)
    gy = randn(*out.shape, dtype=torch.bfloat16)
    out.backward(gy)
    out_ref.backward(gy.double())
    assert out.dtype == torch.bfloat16
    assert calc_diff(out, out_ref) < 2e-5
    assert calc_diff(xb.grad, x64.grad) < 2e-5
    refs = dict(ref.named_parameters())
    for name, p in moe.named_parameters():
        if name.startswith("gate."):
            continue  # the router is not reached by routed_local
        assert calc_diff(p.grad, refs[name].grad) < 2e-5, name


def test_dense_model_logits_and_gradients_match_float64(mode: str) -> None:
    """MLA linears, attention, dense FFN and head in BF16 against float64 (no MoE layer, so no MTP
    block either, which is always a MoE layer: routing near-ties would flip between precisions)."""
    args = ModelArgs.preset("tiny", dtype="bfloat16", n_mtp_layers=0)
    args = args.replace(n_dense_layers=args.n_layers)
    model = Transformer(args)
    ref = Transformer(args.replace(dtype="float64"))
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    tokens = torch.randint(0, args.vocab_size, (2, 48))
    loss, _ = model.compute_loss(tokens, tokens)
    loss_ref, _ = ref.compute_loss(tokens, tokens)
    loss.backward()
    loss_ref.backward()
    assert calc_diff(model(tokens), ref(tokens)) < 1e-4
    refs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert calc_diff(p.grad, refs[name].grad) < 5e-4, name  # measured up to 1e-4
