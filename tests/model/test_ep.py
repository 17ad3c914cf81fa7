"""Expert parallel: the model with experts sharded over gloo ranks equals the single-process
model on the concatenated batch (forward and gradients).

comm.all_to_all carries float32/bfloat16 only, so this runs in float32: calc_diff is quadratic
in the relative error, so float32 rounding (~1e-7) still lands near 1e-13."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from model import ModelArgs, Transformer
from model.ep import shard_state_dict
from ops import calc_diff
from tests.harness.distributed import run_distributed


def _ep_equals_single(rank: int, world_size: int, seed: int, n_experts: int) -> dict[str, float]:
    args = ModelArgs.preset("tiny", dtype="float32", n_routed_experts=n_experts, n_expert_groups=2,
                            n_limited_groups=1, seq_aux_alpha=0.01)
    torch.manual_seed(seed)
    full = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2 * world_size, 16))
    targets = torch.randint(0, args.vocab_size, (2 * world_size, 16))
    ep = Transformer(args, ep_group=dist.group.WORLD)
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    mine = slice(2 * rank, 2 * rank + 2)

    ref_logits = full(tokens)[mine]
    logits = ep(tokens[mine])
    loss_ref, _ = full.compute_loss(tokens, targets)
    loss_ref.backward()
    loss, _ = ep.compute_loss(tokens[mine], targets[mine])
    (loss / world_size).backward()
    ref_grads = dict(full.named_parameters())
    worst = 0.0
    for name, p in ep.named_parameters():
        g = p.grad.clone()
        ref = ref_grads[name].grad
        if ".experts." in name:
            moe = ep.get_submodule(name.rsplit(".experts.", 1)[0])
            ref = ref[moe.expert_start : moe.expert_start + moe.n_local]
        else:
            dist.all_reduce(g)  # replicated parameters: data-parallel sum over the ranks
        worst = max(worst, calc_diff(g, ref))
    loads = ep.expert_load()
    dist.all_reduce(loads)
    full_loads = full.expert_load()
    return {"fwd": calc_diff(logits, ref_logits), "grad": worst,
            "load": float((loads - full_loads).abs().max())}


@pytest.mark.parametrize(("world_size", "n_experts"), [(2, 8), (4, 8), (3, 6)])
def test_expert_parallel_model_equals_single_process(world_size: int, n_experts: int) -> None:
    pytest.importorskip("comm.all_to_all")
    seed = torch.randint(0, 2**31, ()).item()
    results = run_distributed(_ep_equals_single, world_size, seed, n_experts, timeout=600)
    for r in results:
        assert r["fwd"] < 1e-10, results
        assert r["grad"] < 1e-9, results
        assert r["load"] == 0, results
