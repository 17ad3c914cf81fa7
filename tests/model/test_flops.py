"""Parameter and FLOPs accounting."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer, count_params, flops_per_token


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 0}, {"n_mtp_layers": 0}, {"n_shared_experts": 0, "n_dense_layers": 0}])
def test_count_params_matches_the_built_model(changes: dict) -> None:
    args = ModelArgs.preset("tiny", **changes)
    with torch.device("meta"):
        model = Transformer(args)
    total, active = count_params(args)
    assert total == sum(p.numel() for p in model.parameters())
    # active: every parameter except the routed experts not chosen for a token
    per_expert = 3 * args.dim * args.moe_inter_dim
    n_moe = len(model.moe_layers())
    assert total - active == n_moe * (args.n_routed_experts - args.n_activated_experts) * per_expert


def test_671b_totals() -> None:
    # shared/REFERENCE.md: without MTP about 671.0B total and 37.5B active
    total, active = count_params(ModelArgs.preset("671B", n_mtp_layers=0))
    assert total == pytest.approx(671.0e9, rel=2e-3)
    assert active == pytest.approx(37.5e9, rel=3e-3)
    with_mtp, _ = count_params(ModelArgs.preset("671B"))
    assert 11e9 < with_mtp - total < 15e9  # MTP adds about 14B in DeepSeek's files (which copy embed and head)


def test_flops_formula() -> None:
    # 6 * active non-embedding params (head included) + 6 * L * H * (dqk + dv) * S, no causal discount
    args = ModelArgs.preset("671B", n_mtp_layers=0)
    _, active = count_params(args)
    active_nonembed = active - args.vocab_size * args.dim
    seq = 4096
    attn = 6 * 61 * 128 * (192 + 128) * seq
    assert flops_per_token(args, seq) == 6 * active_nonembed + attn
    assert flops_per_token(args, seq, causal_discount=True) == 6 * active_nonembed + attn / 2
    mtp = ModelArgs.preset("671B")
    assert flops_per_token(mtp, seq) > flops_per_token(args, seq) + 6 * args.dim * args.vocab_size
