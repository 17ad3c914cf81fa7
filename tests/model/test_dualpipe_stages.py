"""The model's stage modules under dualpipe's DualPipeV on 2 gloo ranks (4 stages, the overlap
hook called for every F&B pair) equal the single-process Transformer: losses and gradients."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer
from model.pipeline import PipelineStage, StageCriterion, build_stage
from ops import calc_diff
from tests.harness.distributed import run_distributed

CHUNKS = 4


def _dualpipev_equals_single(rank: int, world_size: int, seed: int) -> dict[str, float]:
    import dualpipe

    args = ModelArgs.preset("tiny", dtype="float64", n_layers=4, seq_aux_alpha=0.05)
    torch.manual_seed(seed)
    full = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2 * CHUNKS, 12))
    targets = torch.randint(0, args.vocab_size, (2 * CHUNKS, 12))
    n_stages = 2 * world_size
    ids = (rank, n_stages - 1 - rank)  # DualPipeV: rank r holds stages r and 2N-1-r
    first = build_stage(args, ids[0], n_stages)
    shared = first.embed if ids[0] == 0 else None
    second = build_stage(args, ids[1], n_stages, mtp_embed=shared)
    for st in (first, second):
        st.load_state_dict(full.state_dict(), strict=False)
    pipe = dualpipe.DualPipeV((first, second))
    if rank == 0:
        losses, _ = pipe.step(tokens, num_chunks=CHUNKS, criterion=StageCriterion(args), labels=(targets,))
    else:
        losses, _ = pipe.step(num_chunks=CHUNKS)

    ref_losses = []
    for tok, tgt in zip(tokens.tensor_split(CHUNKS), targets.tensor_split(CHUNKS), strict=True):
        loss, metrics = full.compute_loss(tok, tgt)
        loss.backward()
        ref_losses.append(loss.item() - metrics["balance_loss"])
    ref = dict(full.named_parameters())
    worst = 0.0
    for st in (first, second):
        assert isinstance(st, PipelineStage)
        for name, p in st.named_parameters():
            if name.startswith("mtp_embed"):
                continue
            worst = max(worst, calc_diff(p.grad, ref[name].grad))
    loss_err = 0.0 if losses is None else max(abs(a - b) for a, b in zip(losses.tolist(), ref_losses, strict=True))
    return {"grad": worst, "loss": loss_err, "hook_calls": len(pipe.hook_calls)}


def test_dualpipev_with_model_stages_equals_single_process() -> None:
    pytest.importorskip("dualpipe.pipelines")
    seed = torch.randint(0, 2**31, ()).item()
    results = run_distributed(_dualpipev_equals_single, 2, seed, timeout=600)
    for r in results:
        assert r["grad"] < 1e-10, results  # ARCHITECTURE.md: pipeline gradients vs single process
        assert r["loss"] < 1e-12, results
    assert sum(r["hook_calls"] for r in results) > 0
