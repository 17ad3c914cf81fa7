"""model/attention.py: chunked causal MLA attention (shared rope key) against a float64 reference
that builds the full masked score matrix, forward and every gradient, over sequence lengths that
are and are not multiples of the chunk, both backward modes, and inside the model against the
scaled_dot_product_attention path it replaces on CPUs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from model import ModelArgs, Transformer, attention, mla
from ops import calc_diff
from tests.harness.tensors import randn

H, DN, R, DV = 3, 16, 8, 12


@pytest.fixture(autouse=True)
def poison_empty_tensors() -> Iterator[None]:
    """Every torch.empty/new_empty/empty_like is NaN-filled (torch's deterministic mode fills
    uninitialised memory), so an output or gradient row the kernel forgot to write shows up."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _inputs(bsz: int, seqlen: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Leaf tensors laid out as MLA produces them: q_nope/q_pe and k_nope/v are strided views of
    one projection each, k_pe is one key per position."""
    q = randn(bsz, seqlen, H, DN + R, dtype=dtype).requires_grad_()
    kv = randn(bsz, seqlen, H, DN + DV, dtype=dtype).requires_grad_()
    k_pe = randn(bsz, seqlen, R, dtype=dtype).requires_grad_()
    return [q, kv, k_pe]


def _split(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q_nope, q_pe = torch.split(q, [DN, R], dim=-1)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    return q_nope, q_pe, k_nope, k_pe, v


def _reference(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, scale: float) -> torch.Tensor:
    """Textbook attention in float64: k = [k_nope, k_pe for every head], full [S, S] scores,
    -inf above the diagonal, softmax, times v."""
    q_nope, q_pe, k_nope, k_pe, v = _split(q, kv, k_pe)
    qf = torch.cat([q_nope, q_pe], -1).transpose(1, 2)  # [B, H, S, Dqk]
    kf = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], -1).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) * scale
    s = scores.size(-1)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ v.transpose(1, 2)).transpose(1, 2)  # [B, S, H, Dv]


def _compare(bsz: int, seqlen: int, dtype: torch.dtype, chunk: int, save_probs: bool | None) -> dict[str, float]:
    scale = (DN + R) ** -0.5 * 1.3
    leaves = _inputs(bsz, seqlen, dtype)
    out = attention.causal_mla_attention(*_split(*leaves), scale, chunk=chunk, save_probs=save_probs)
    assert out.dtype == dtype and out.shape == (bsz, seqlen, H, DV)
    grad = randn(*out.shape, dtype=dtype)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _reference(*ref_leaves, scale)
    ref.backward(grad.double())
    diffs = {"out": calc_diff(out, ref)}
    for name, t, r in zip(["grad_q", "grad_kv", "grad_k_pe"], leaves, ref_leaves, strict=True):
        assert t.grad.dtype == dtype and not t.grad.isnan().any(), name
        if not r.grad.any():  # one position: softmax over one key, so no gradient reaches q
            assert t.grad.abs().max() < 1e-12, name  # dP - rowsum(dO * O): rounding only
            continue
        diffs[name] = calc_diff(t.grad, r.grad)
    return diffs


@pytest.mark.parametrize("seqlen", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("save_probs", [True, False])
def test_matches_float64_reference_in_float64(seqlen: int, save_probs: bool) -> None:
    """chunk 16: one chunk, several, and a ragged last one (7, 33); every gradient too."""
    for name, d in _compare(2, seqlen, torch.float64, 16, save_probs).items():
        assert d < 1e-12, (name, d)


@pytest.mark.parametrize("seqlen,chunk", [(100, 32), (130, attention.CHUNK), (257, attention.CHUNK)])
@pytest.mark.parametrize("save_probs", [True, False, None])
def test_matches_float64_reference_in_float32(seqlen: int, chunk: int, save_probs: bool | None) -> None:
    # measured ~1e-14 to 1e-13 (FP32 rounding of sums of a few hundred terms); bound 100x that
    for name, d in _compare(1, seqlen, torch.float32, chunk, save_probs).items():
        assert d < 1e-11, (name, d)


def test_bfloat16_inputs_attend_in_float32_and_round_once() -> None:
    # one BF16 rounding of each input and of the output: calc_diff ~1e-6 (test_precision.py)
    for name, d in _compare(2, 40, torch.bfloat16, 16, None).items():
        assert d < 2e-5, (name, d)


def test_saving_probabilities_follows_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backward modes give the same gradients, and the budget picks between them."""
    assert attention._probs_bytes(1, 2, 5, 2, 4) == 2 * (2 * 2 + 2 * 4 + 1 * 5) * 4
    seen = []
    original = attention._ChunkedCausalAttention.apply
    monkeypatch.setattr(attention._ChunkedCausalAttention, "apply", lambda *a: seen.append(a[-1]) or original(*a))
    leaves = _inputs(1, 20, torch.float64)
    grads = []
    for budget in (10**9, 0):
        monkeypatch.setattr(attention, "SAVED_PROBS_BUDGET", budget)
        for t in leaves:
            t.grad = None
        attention.causal_mla_attention(*_split(*leaves), 0.2, chunk=8).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    assert seen == [True, False]
    for a, b in zip(*grads, strict=True):
        assert calc_diff(a, b) < 1e-14


@pytest.mark.parametrize("save_probs", [True, False])
def test_a_retained_graph_runs_backward_twice(save_probs: bool) -> None:
    """What backward needs is saved through autograd, not consumed: a second backward over a
    retained graph gives the same gradients again (accumulated: twice the first)."""
    leaves = _inputs(2, 19, torch.float64)
    out = attention.causal_mla_attention(*_split(*leaves), 0.3, chunk=8, save_probs=save_probs)
    grad = randn(*out.shape, dtype=torch.float64)
    out.backward(grad, retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    out.backward(grad)
    for t, g in zip(leaves, first, strict=True):
        assert calc_diff(t.grad, 2 * g) < 1e-14


def test_bad_inputs_raise_naming_the_argument() -> None:
    q_nope, q_pe, k_nope, k_pe, v = (t.detach() for t in _split(*_inputs(1, 8, torch.float32)))
    with pytest.raises(ValueError, match="k_pe"):
        attention.causal_mla_attention(q_nope, q_pe, k_nope, k_pe[:, :4], v, 0.1)
    with pytest.raises(ValueError, match="v must have shape"):
        attention.causal_mla_attention(q_nope, q_pe, k_nope, k_pe, v[:, :, :2], 0.1)
    with pytest.raises(TypeError, match="k_nope"):
        attention.causal_mla_attention(q_nope, q_pe, k_nope.double(), k_pe, v, 0.1)
    with pytest.raises(ValueError, match="chunk"):
        attention.causal_mla_attention(q_nope, q_pe, k_nope, k_pe, v, 0.1, chunk=0)


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_model_equals_the_sdpa_path_in_float64(monkeypatch: pytest.MonkeyPatch, q_lora_rank: int) -> None:
    """The whole model's logits and every parameter's gradient, chunked attention against the
    scaled_dot_product_attention path (concatenated q/k, expanded rope key) it replaces on CPUs."""
    torch.use_deterministic_algorithms(False)  # the model's index_add has no deterministic CPU form
    args = ModelArgs.preset("tiny", dtype="float64", n_layers=2, q_lora_rank=q_lora_rank)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 37))
    results = []
    for chunked in (True, False):
        monkeypatch.setattr(mla, "_chunked_attention", lambda x, on=chunked: on)
        model.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(tokens, torch.roll(tokens, -1, 1))
        loss.backward()
        results.append((model(tokens).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = results
    assert calc_diff(logits, ref_logits) < 1e-14
    for name, g in grads.items():
        assert calc_diff(g, ref_grads[name]) < 1e-12, name


def test_chosen_on_cpu_for_float_work_dtypes_only() -> None:
    cpu = torch.zeros(1)
    assert mla._chunked_attention(cpu) and mla._chunked_attention(cpu.double())
    from model import precision

    for mode, expected in (("upcast", True), ("native", False)):
        precision.set_bf16_matmul(mode)
        try:
            assert mla._chunked_attention(cpu.bfloat16()) is expected
        finally:
            precision.set_bf16_matmul(None)
    assert not mla._chunked_attention(torch.zeros(1, device="meta"))
