"""Expert parallel: the model with experts sharded over gloo ranks equals the single-process
model on the concatenated batch (forward and gradients, float64), also in FP8 mode (FP8
dispatch payload), and the shared experts run while the dispatch is in flight."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from model import ModelArgs, Transformer
from model.ep import shard_state_dict
from ops import calc_diff
from tests.harness.distributed import run_distributed

pytest.importorskip("comm.all_to_all")


def _max_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: unlike calc_diff (quadratic in the error, and resolving only
    ~1e-16 around its 1 - ...), it tells float64 (~1e-15) from a float32 round trip (~1e-7)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _ep_vs_single(rank: int, world_size: int, seed: int, n_experts: int, dtype: str, fp8: bool) -> dict[str, float]:
    args = ModelArgs.preset("tiny", dtype=dtype, n_routed_experts=n_experts, n_expert_groups=2,
                            n_limited_groups=1, seq_aux_alpha=0.01, fp8=fp8)
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
    worst, worst_rel, total, total_ref = 0.0, 0.0, [], []
    for name, p in ep.named_parameters():
        g = p.grad.clone()
        ref = ref_grads[name].grad
        if ".experts." in name:
            moe = ep.get_submodule(name.rsplit(".experts.", 1)[0])
            ref = ref[moe.expert_start : moe.expert_start + moe.n_local]
        else:
            dist.all_reduce(g)  # replicated parameters: data-parallel sum over the ranks
        worst = max(worst, calc_diff(g, ref))
        worst_rel = max(worst_rel, _max_rel(g, ref))
        total.append(g.flatten())
        total_ref.append(ref.flatten())
    loads = ep.expert_load()
    dist.all_reduce(loads)
    full_loads = full.expert_load()
    return {"fwd": calc_diff(logits, ref_logits), "fwd_rel": _max_rel(logits, ref_logits), "grad": worst, "grad_rel": worst_rel, "all_grads": calc_diff(torch.cat(total), torch.cat(total_ref)),
            "load": float((loads - full_loads).abs().max())}


@pytest.mark.parametrize(("world_size", "n_experts"), [(2, 8), (4, 8), (3, 6)])
def test_expert_parallel_model_equals_single_process(world_size: int, n_experts: int) -> None:
    seed = torch.randint(0, 2**31, ()).item()
    results = run_distributed(_ep_vs_single, world_size, seed, n_experts, "float64", False, timeout=600)
    for r in results:
        # float64 throughout (comm moves float64 rows bit-exactly and sums them in float64): only
        # the summation order differs. calc_diff < 1e-14 is the project's float64 bound (a few
        # ulps of its 1 - ...); the max relative error pins float64 precision (a float32 round
        # trip anywhere would give ~1e-7).
        assert r["fwd"] < 1e-14 and r["grad"] < 1e-14, results
        assert r["fwd_rel"] < 1e-12 and r["grad_rel"] < 1e-12, results
        assert r["load"] == 0, results


def test_expert_parallel_fp8_model_matches_single_process_fp8() -> None:
    # FP8 mode: the dispatch payload is FP8 (1x128 tiles), exactly what the local FP8 experts
    # quantize their input to, so the forward agrees up to the FP32 summation order of the
    # combine (measured: identical). Gradients go back in high precision (straight-through for
    # the payload cast); they differ at FP8 precision because the Wgrad GEMM quantizes the
    # activations in 128-token blocks along the token dimension, and EP groups different tokens
    # into those blocks than one process does: judged against the FP8 GEMM bound (1e-3,
    # ARCHITECTURE.md) over all parameters (measured ~2e-4).
    seed = torch.randint(0, 2**31, ()).item()
    results = run_distributed(_ep_vs_single, 2, seed, 8, "float32", True, timeout=600)
    for r in results:
        assert r["fwd"] < 1e-10, results
        assert r["all_grads"] < 1e-3, results
        assert r["load"] == 0, results


def _trace_moe_overlap(rank: int, world_size: int, seed: int, fp8: bool) -> list[tuple]:
    from comm.all_to_all import Buffer

    args = ModelArgs.preset("tiny", dtype="float32", n_mtp_layers=0, n_layers=2, fp8=fp8)
    torch.manual_seed(seed)
    ep = Transformer(args, ep_group=dist.group.WORLD)
    moe = ep.moe_layers()[0]
    log: list[tuple] = []
    real_dispatch = Buffer.dispatch

    def dispatch(self, x, *a, **kw):
        out = real_dispatch(self, x, *a, **kw)
        form = "fp8" if isinstance(x, tuple) and x[0].dtype == torch.float8_e4m3fn else str(x.dtype)
        log.append(("dispatch", form, kw.get("async_finish", False), kw.get("handle") is not None))
        event = out[-1]
        real_wait = event.current_stream_wait
        event.current_stream_wait = lambda: (log.append(("wait",)), real_wait())[1]
        return out

    Buffer.dispatch = dispatch
    try:
        moe.shared_experts.register_forward_pre_hook(lambda *_: log.append(("shared",)))
        ep(torch.randint(0, args.vocab_size, (2, 8)))
    finally:
        Buffer.dispatch = real_dispatch
    return log


@pytest.mark.parametrize("fp8", [False, True])
def test_shared_experts_run_while_dispatch_is_in_flight(fp8: bool) -> None:
    seed = torch.randint(0, 2**31, ()).item()
    for log in run_distributed(_trace_moe_overlap, 2, seed, fp8, timeout=300):
        assert log[0] == ("dispatch", "fp8" if fp8 else "torch.float32", True, False), log
        assert log[1:3] == [("shared",), ("wait",)], log
