"""The single-process model: shapes, causality, determinism, gradients, loss parts, absorbed
inference and cached generation, expert-bias update."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer
from model.generate import generate
from ops import calc_diff


def _tiny(**kw) -> ModelArgs:
    return ModelArgs.preset("tiny", **{"dtype": "float64", **kw})


def _tokens(args: ModelArgs, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, seq))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_forward_shapes_and_dtypes(dtype: str, q_lora_rank: int) -> None:
    args = _tiny(dtype=dtype, q_lora_rank=q_lora_rank)
    model = Transformer(args)
    logits = model(_tokens(args, 3, 17))
    assert logits.shape == (3, 17, args.vocab_size)
    assert logits.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert torch.isfinite(logits).all()


def test_changing_a_future_token_never_changes_an_earlier_logit() -> None:
    args = _tiny()
    model = Transformer(args)
    tokens = _tokens(args, 2, 20)
    changed = tokens.clone()
    changed[:, 13] = (changed[:, 13] + 1) % args.vocab_size
    a, b = model(tokens), model(changed)
    # not bit-equal: the changed token changes expert segment sizes, hence GEMM blocking (1e-16)
    assert (a[:, :13] - b[:, :13]).abs().max() < 1e-12
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-6


def test_same_seed_same_model_and_outputs() -> None:
    args = _tiny(dtype="float32")
    seed = torch.randint(0, 2**31, ()).item()
    torch.manual_seed(seed)
    m1 = Transformer(args)
    torch.manual_seed(seed)
    m2 = Transformer(args)
    tokens = _tokens(args)
    assert torch.equal(m1(tokens), m2(tokens))
    assert torch.equal(m1(tokens), m1(tokens))
    m3 = Transformer(args)
    assert not torch.equal(m1(tokens), m3(tokens))


def test_gradients_reach_every_learnable_parameter_but_not_the_expert_bias() -> None:
    args = _tiny(n_expert_groups=1, n_limited_groups=1)
    model = Transformer(args)
    tokens = _tokens(args, 4, 32)
    loss, _ = model.compute_loss(tokens, torch.roll(tokens, -1, 1))
    loss.backward()
    loads = {id(m): m.expert_load.clone() for m in model.moe_layers()}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for m in model.moe_layers():
        for e, load in enumerate(loads[id(m)]):
            if load > 0:
                assert m.experts.w1.grad[e].abs().sum() > 0
            else:
                assert m.experts.w1.grad[e].abs().sum() == 0
        assert "gate.expert_bias" in dict(m.named_buffers())
        assert not m.gate.expert_bias.requires_grad


def test_loss_is_main_plus_weighted_mtp_plus_balance() -> None:
    args = _tiny(mtp_loss_weight=0.25, seq_aux_alpha=0.01)
    model = Transformer(args)
    tokens = _tokens(args, 2, 16)
    targets = torch.randint(0, args.vocab_size, tokens.shape)
    targets[0, 3] = -100
    loss, metrics = model.compute_loss(tokens, targets)
    logits = model(tokens)
    main = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert metrics["main_loss"] == pytest.approx(main.item(), rel=1e-12)
    assert metrics["balance_loss"] > 0
    expected = metrics["main_loss"] + 0.25 * metrics["mtp_loss"] + metrics["balance_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)


def test_mtp_predicts_two_ahead_from_the_next_token() -> None:
    # MTP at position i sees tokens <= i+1 only: changing token i+2 leaves its prediction alone.
    args = _tiny()
    model = Transformer(args)
    tokens = _tokens(args, 1, 12)
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 3) % args.vocab_size
    a = model.mtp_logits(model.trunk(tokens), tokens)
    b = model.mtp_logits(model.trunk(changed), changed)
    assert a.shape == (1, 11, args.vocab_size)
    assert (a[:, :6] - b[:, :6]).abs().max() < 1e-12 and (a[:, 6] - b[:, 6]).abs().max() > 1e-6


def test_bad_tokens_raise() -> None:
    args = _tiny()
    model = Transformer(args)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randint(0, 10, (2, 3), dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 10, (1, args.max_seq_len + 1)))
    with pytest.raises(ValueError, match="targets"):
        model.compute_loss(_tokens(args, 2, 5), _tokens(args, 2, 4))


@pytest.mark.parametrize("yarn", [False, True])
def test_absorbed_inference_equals_training_form(yarn: bool) -> None:
    extra = dict(max_seq_len=512, original_seq_len=128, rope_factor=4.0) if yarn else {}
    args = _tiny(**extra)
    model = Transformer(args)
    tokens = _tokens(args, 2, 21)
    ref = model(tokens)
    cache = model.new_cache(2, 32)
    prefill = model.forward_cached(tokens[:, :9], cache, 0)
    steps = [model.forward_cached(tokens[:, i : i + 1], cache, i) for i in range(9, 21)]
    got = torch.cat([prefill, *steps], dim=1)
    assert calc_diff(got, ref) < 1e-10


def test_generate_with_cache_equals_without() -> None:
    args = _tiny()
    model = Transformer(args)
    prompt = _tokens(args, 2, 7)
    a = generate(model, prompt, 10, temperature=0.0)
    b = generate(model, prompt, 10, temperature=0.0, use_cache=False)
    assert a.shape == (2, 17) and torch.equal(a[:, :7], prompt)
    assert torch.equal(a, b)
    seed = torch.randint(0, 2**31, ()).item()
    s1 = generate(model, prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(seed))
    s2 = generate(model, prompt, 6, temperature=1.0, top_k=5, use_cache=False, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(s1, s2)


def test_update_expert_bias_uses_the_step_load_and_resets_it() -> None:
    args = _tiny(bias_update_speed=0.5)
    model = Transformer(args)
    tokens = _tokens(args, 2, 16)
    model.compute_loss(tokens, tokens)
    load = model.expert_load()
    n_moe = len(model.moe_layers())
    assert load.shape == (n_moe, args.n_routed_experts)
    k = args.n_activated_experts
    assert load[:-1].sum(1).tolist() == [2 * 16 * k] * (n_moe - 1)
    assert load[-1].sum().item() == 2 * 15 * k  # the MTP layer (last) sees S-1 positions
    before = torch.stack([m.gate.expert_bias.clone() for m in model.moe_layers()])
    used = model.update_expert_bias()
    after = torch.stack([m.gate.expert_bias for m in model.moe_layers()])
    assert torch.equal(used, load)
    assert torch.equal(after - before, 0.5 * torch.sign(load.mean(1, keepdim=True) - load))
    assert model.expert_load().sum() == 0
