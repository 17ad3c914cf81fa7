"""FP8 mode: every MLA/MoE/FFN linear through ops' FP8 linears; embedding, head, router and
norms stay high precision (DeepSeek-V3 report 3.3)."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer
from model.layers import FP8Linear
from ops import calc_diff

pytest.importorskip("ops.linear")


def _pair(**kw):
    args = ModelArgs.preset("tiny", dtype="float32", **kw)
    ref = Transformer(args)
    fp8 = Transformer(args.replace(fp8=True))
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def test_fp8_mode_uses_fp8_linears_where_the_recipe_says() -> None:
    _, fp8 = _pair()
    fp8_names = {n for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    plain = {n for n, m in fp8.named_modules() if isinstance(m, torch.nn.Linear) and n not in fp8_names}
    assert any(".attn.wkv_b" in n for n in fp8_names) and any(".ffn.shared_experts.w2" in n for n in fp8_names)
    assert any(n.startswith("layers.0.ffn.w1") for n in fp8_names)  # dense FFN
    assert plain == {"head", "mtp.0.eh_proj"}
    assert fp8.moe_layers()[0].experts.fp8


def test_fp8_forward_and_gradients_are_close_to_float32() -> None:
    ref, fp8 = _pair()
    tokens = torch.randint(0, 256, (2, 32))
    targets = torch.randint(0, 256, (2, 32))
    loss_ref, _ = ref.compute_loss(tokens, targets)
    loss, _ = fp8.compute_loss(tokens, targets)
    # each FP8 GEMM is ~1e-3 off (ops' tolerance); a dozen of them in series, plus routing flips
    assert calc_diff(fp8(tokens), ref(tokens)) < 1e-2
    loss_ref.backward()
    loss.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in fp8.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # routed-expert and router gradients hinge on which expert wins near-ties, which FP8
        # noise flips (so does the norm in front of them): judged only in the whole-model total below
        if p.grad.abs().sum() > 0 and not (".gate." in name or ".experts." in name or "ffn_norm" in name):
            assert calc_diff(p.grad, grads_ref[name].grad) < 5e-2, name
    flat = torch.cat([p.grad.flatten() for p in fp8.parameters()])
    flat_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert calc_diff(flat, flat_ref) < 2e-2


def _markov_batch(states: torch.Tensor, succ: torch.Tensor, rows: int, g: torch.Generator) -> torch.Tensor:
    """[rows, 33] tokens of a fixed order-1 Markov chain over 16 byte values, 2 successors each."""
    idx = [torch.randint(0, 16, (rows,), generator=g)]
    for _ in range(32):
        idx.append(succ[idx[-1], torch.randint(0, 2, (rows,), generator=g)])
    return states[torch.stack(idx, dim=1)]


def _train(args: ModelArgs, steps: int, seed: int) -> float:
    """Held-out main loss after `steps` AdamW steps (cosine decay to zero) on a learnable stream.

    Why this form: with a constant learning rate the last-steps training loss of this tiny model
    depends on its trajectory (two bf16 runs of one seed that differed only in thread count ended
    4% apart), which would drown the FP8 error the test looks for. Decaying the rate to zero
    and evaluating on 64 held-out sequences measures where training converged instead. Every
    state has two distinct successors, so every seed's task has the same entropy floor (ln 2).
    The optimizer keeps FP32 master weights and copies them into the model's parameters after
    each step, as launch/optim.py does for a bf16 model."""
    torch.manual_seed(seed)
    model = Transformer(args)
    params = list(model.parameters())
    master = [p.detach().float().clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(master, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    states = torch.randperm(256, generator=g)[:16]
    succ = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(16)])
    held_out = _markov_batch(states, succ, 64, torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        batch = _markov_batch(states, succ, 8, g)
        loss, _ = model.compute_loss(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        model.zero_grad(set_to_none=True)
        loss.backward()
        for m, p in zip(master, params, strict=True):
            m.grad = p.grad.float()
        opt.step()
        sched.step()
        with torch.no_grad():
            for m, p in zip(master, params, strict=True):
                p.copy_(m)
        model.update_expert_bias()
    model.eval()
    with torch.no_grad():
        _, metrics = model.compute_loss(held_out[:, :-1].contiguous(), held_out[:, 1:].contiguous())
    return float(metrics["main_loss"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fp8_training_tracks_bf16() -> None:
    # issue 6: the tiny preset trained 300 steps in FP8 reaches a loss within 1% of the BF16
    # run. Both runs as the trainer runs them: bf16 parameters, FP32 master weights; FP8 mode
    # adds the FP8 GEMMs (DeepSeek-V3 report 3.3 reports < 0.25% relative loss error).
    # One seed is not enough to resolve 1%: routing flips make each trajectory chaotic, and the
    # same seed's bf16 run ended 0.704 on one machine and 0.713 on another (CI, whose FP8 run
    # ended 0.702, 1.6% away). Most seeds agree within 0.1%, so the test compares the mean over
    # three seeds, which a systematic FP8 error of 1% still fails.
    seeds = torch.randint(0, 2**31, (3,)).tolist()
    args = ModelArgs.preset("tiny", dtype="bfloat16", n_mtp_layers=0)
    bf16 = [_train(args, 300, s) for s in seeds]
    fp8 = [_train(args.replace(fp8=True), 300, s) for s in seeds]
    assert max(bf16) < 1.0, bf16  # each learned (ln 256 = 5.5 at the start, ln 2 = 0.69 the floor)
    mean_bf16, mean_fp8 = sum(bf16) / 3, sum(fp8) / 3
    assert abs(mean_fp8 - mean_bf16) / mean_bf16 < 0.01, (seeds, fp8, bf16)


@pytest.mark.parametrize("inter", [128, 96])
def test_grouped_swiglu_fp8_fuses_gate_and_up_only_when_blocks_do_not_straddle(inter: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """inter % 128 == 0: one grouped FP8 linear for [w1; w3] (2 calls in all), with the FP8 values
    of the separate linears, so outputs and gradients equal the unfused formulation up to FP32
    summation order; otherwise three calls, exactly the unfused formulation."""
    import ops
    from model.fp8 import grouped_swiglu_fp8
    from tests.harness.tensors import randn

    counts = [5, 0, 17, 9]
    n, dim = sum(counts), 256
    x = randn(n, dim)
    ws = [randn(4, inter, dim, scale=0.1), randn(4, dim, inter, scale=0.1), randn(4, inter, dim, scale=0.1)]
    gy = randn(n, dim)
    calls = []
    real = ops.grouped_fp8_linear

    def counting(*a):
        calls.append(a[1].shape)
        return real(*a)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, *ws)]
        y = fn(leaves[0], *leaves[1:], counts)
        y.backward(gy)
        return [y.detach()] + [t.grad for t in leaves]

    def unfused(x, w1, w2, w3, counts):
        return real(torch.nn.functional.silu(real(x, w1, counts)) * real(x, w3, counts), w2, counts)

    monkeypatch.setattr(ops, "grouped_fp8_linear", counting)
    got = run(grouped_swiglu_fp8)
    assert len(calls) == (2 if inter % 128 == 0 else 3)
    ref = run(unfused)
    for name, g, r in zip(["y", "x", "w1", "w2", "w3"], got, ref, strict=True):
        assert torch.isfinite(g).all(), name
        assert calc_diff(g, r) < 1e-12, name
