"""PipelineStage.overlapped_forward_backward: with expert parallel and one EP group per stage
module, one chunk's forward and another chunk's backward run concurrently, and the results equal
running them one after the other (float64)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from model import ModelArgs
from model.pipeline import PipelineStage, StageCriterion, build_stage, can_overlap
from ops import calc_diff
from tests.harness.distributed import run_distributed

pytest.importorskip("comm.all_to_all")
pytest.importorskip("dualpipe.executor")


def _stages(args: ModelArgs, groups: tuple, seed: int) -> tuple[PipelineStage, PipelineStage]:
    torch.manual_seed(seed)  # same weights on every rank and for every build
    return build_stage(args, 0, 2, ep_group=groups[0]), build_stage(args, 1, 2, ep_group=groups[1])


def _overlap_equals_sequential(rank: int, world_size: int, seed: int) -> dict:
    args = ModelArgs.preset("tiny", dtype="float64", n_layers=2, n_dense_layers=0, n_mtp_layers=0)  # one MoE layer per stage
    world = list(range(world_size))
    g0, g1 = dist.new_group(world), dist.new_group(world)  # one EP group per stage module
    torch.manual_seed(seed + rank)
    tok_a, tok_b = torch.randint(0, args.vocab_size, (2, 2, 12))
    targets = torch.randint(0, args.vocab_size, (2, 12))
    crit = StageCriterion(args)

    def pair(s0: PipelineStage, s1: PipelineStage, hook: bool, probe: bool = False):
        # chunk A already went forward through both stages; now: forward of B on s0 with the
        # backward of A on s1 (the stage boundary detached, as dualpipe's executor does)
        h, t = s0(tok_a)
        loss_a = crit(*s1(h.detach().requires_grad_(), t), targets)
        seen = {}
        if probe:
            # each side waits, mid-way, for the other to have started: sequential execution (in
            # either order) would time out one of the waits
            started_fwd, started_bwd = threading.Event(), threading.Event()

            def in_backward(grad: torch.Tensor) -> torch.Tensor:
                started_bwd.set()
                seen["bwd_saw_fwd"] = started_fwd.wait(30)
                seen["bwd_thread"] = threading.get_ident()
                return grad

            def in_forward(*_) -> None:
                started_fwd.set()
                seen["fwd_saw_bwd"] = started_bwd.wait(30)

            s1.head.weight.register_hook(in_backward)
            s0.moe_layers()[-1].register_forward_pre_hook(in_forward)
        if hook:
            out_b, _ = PipelineStage.overlapped_forward_backward(s0, (tok_b,), None, [], s1, loss_a, None, None)
        else:
            out_b = s0(tok_b)
            loss_a.backward()
        seen["main_thread"] = threading.get_ident()
        return out_b[0], {n: p.grad for n, p in s1.named_parameters()}, seen

    ref_out, ref_grads, _ = pair(*_stages(args, (g0, g1), seed), hook=False)
    s0, s1 = _stages(args, (g0, g1), seed)
    out, grads, seen = pair(s0, s1, hook=True, probe=True)
    shared = _stages(args, (g0, g0), seed)
    return {
        "can_overlap": can_overlap(s0, s1), "shared_group_overlaps": can_overlap(*shared),
        "fwd": calc_diff(out, ref_out), "grad": max(calc_diff(grads[n], ref_grads[n]) for n in grads),
        "fwd_saw_bwd": seen.get("fwd_saw_bwd"), "bwd_saw_fwd": seen.get("bwd_saw_fwd"),
        "other_thread": seen.get("bwd_thread") != seen["main_thread"],
    }


def test_overlapped_forward_backward_runs_concurrently_and_equals_sequential() -> None:
    seed = torch.randint(0, 2**31, ()).item()
    for r in run_distributed(_overlap_equals_sequential, 2, seed, timeout=600):
        assert r["can_overlap"] and not r["shared_group_overlaps"], r
        assert r["fwd_saw_bwd"] and r["bwd_saw_fwd"] and r["other_thread"], r
        assert r["fwd"] < 1e-14 and r["grad"] < 1e-14, r
