"""Pipeline stages: the layer split, and stages chained in one process equal the Transformer."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer
from model.pipeline import PipelineStage, StageCriterion, build_stage, split_layers
from ops import calc_diff


@pytest.mark.parametrize(("n_layers", "n_stages"), [(61, 16), (6, 4), (5, 5), (7, 1), (27, 8)])
def test_split_is_contiguous_and_even(n_layers: int, n_stages: int) -> None:
    parts = split_layers(n_layers, n_stages)
    assert len(parts) == n_stages
    assert [i for r in parts for i in r] == list(range(n_layers))
    sizes = [len(r) for r in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_stage_without_layers_is_an_error() -> None:
    with pytest.raises(ValueError, match="without layers"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match="stage"):
        build_stage(ModelArgs.preset("tiny"), 3, 3 - 1)


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("n_mtp_layers", [0, 1])
def test_chained_stages_equal_the_transformer(n_stages: int, n_mtp_layers: int) -> None:
    args = ModelArgs.preset("tiny", dtype="float64", n_mtp_layers=n_mtp_layers, seq_aux_alpha=0.05)
    full = Transformer(args)
    stages: list[PipelineStage] = []
    for s in range(n_stages):
        shared = stages[0].embed if (s == n_stages - 1 and stages) else None
        stage = build_stage(args, s, n_stages, mtp_embed=shared)
        missing, _unexpected = stage.load_state_dict(full.state_dict(), strict=False)
        assert not [k for k in missing if not k.startswith("mtp_embed")], missing
        if s == n_stages - 1 and stage.mtp_embed is not None and n_stages == 1:
            assert stage.mtp_embed is not stage.embed  # one stage: an own copy, loaded below
        stages.append(stage)
    last = stages[-1]
    if last.mtp_embed is not None and n_stages == 1:
        last.mtp_embed.load_state_dict(full.embed.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 19))
    targets = torch.randint(0, args.vocab_size, (2, 19))

    loss_ref, metrics = full.compute_loss(tokens, targets)
    loss_ref.backward()
    acts: tuple[torch.Tensor, ...] = (tokens,)
    for st in stages:
        acts = st(*acts)
    loss = StageCriterion(args)(*acts, targets)
    assert loss.item() == pytest.approx(loss_ref.item() - metrics["balance_loss"], rel=1e-12)
    loss.backward()
    ref_grads = {n: p.grad for n, p in full.named_parameters()}
    for st in stages:
        for n, p in st.named_parameters():
            if n.startswith("mtp_embed"):
                continue
            g = p.grad
            if n == "embed.weight" and last.mtp_embed is not None and last.mtp_embed is not st.embed:
                g = g + last.mtp_embed.weight.grad  # the untied copy: its gradient is summed by the trainer
            assert calc_diff(g, ref_grads[n]) < 1e-14, n  # float64: a few ulps of summation order
