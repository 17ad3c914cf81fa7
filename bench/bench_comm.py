"""Expert-parallel dispatch + combine on 4 gloo ranks (issue 4), next to its peers.

Shape: 4096 tokens x 2048 hidden (bf16) per rank, top-8 of 64 experts, random routing.
Bandwidth is counted as DeepEP does: bytes RECEIVED per rank / time (payload rows only).

How it is timed (honest, and the same for every entry): each benchmark round runs ONE iteration
on all 4 ranks of a reused gloo pool (tests.harness.distributed); inside, the ranks meet at a
barrier, run the operation, and the SLOWEST rank's wall time is what the round reports. Ours and
the ceiling (the tight 0.8x target) run in one pool call with their rounds interleaved, 11 each,
so that the machine's drift touches both alike; the other peers run 5 rounds on their own. The
main process feeds those per-round times to pytest-benchmark through ``benchmark.pedantic`` on a
function that replays them (so the pool's task round-trip is NOT counted). Inputs are built once
per rank and cached between rounds. Threads: every entry runs in the same pool processes, which
the harness starts with torch.set_num_threads(max(1, cores // ranks)) = 1 on this 2-core
machine; nothing here changes it, so ours, the ceiling and the peers run with the same settings.

Peers (same run, same machine):
- ceiling: ``all_to_all_single`` of exactly the payload bytes our dispatch and combine move
  (same split sizes), no packing, no counts, no layout, and its input and output tensors
  allocated once and reused. Ours returns recv_x / combined_x in cached memory that no tensor
  references any more (comm/memory.py, a caching allocator's rule): here each round drops the
  previous round's outputs, so the cache serves every round, as it does in a model that
  releases them before the next step; outputs the caller still holds get new memory;
- naive: the common plain-PyTorch design that sends one copy per (token, expert) pair
  (argsort + index + count exchange + all_to_all_single, back, weighted index_add_);
- deepspeed: DeepSpeed MoE's ``_AllToAll`` (over ``deepspeed.comm``, initialised on the existing
  gloo group) on its capacity-padded [E, C, H] layout, capacity factor 1.0, weighted combine.
  The layout is built with an index copy / index_add (what DeepSpeed's tutel mode does), not
  MOELayer's dense one-hot einsums: those are 2 x 69 GFLOP per call at this shape, ~10 minutes
  per einsum at bf16 on one thread here, which is what made this peer look "hung" before.
Targets: >= 0.8x the ceiling, >= 2x the naive implementation.

Overlap: async dispatch, a matmul of about the comm's duration, then wait; reported as
total / max(comm, compute) next to the same for torch's own async all_to_all_single.
FP8: the dispatch of (x_fp8, scales) vs the BF16 dispatch (bytes (H + 4H/128) / 2H).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.harness.distributed import run_distributed

WORLD, TOKENS, HIDDEN, TOPK, EXPERTS = 4, 4096, 2048, 8, 64
ROUNDS, WARMUP = 5, 1
_cache: dict = {}


def _inputs(rank: int):
    if "x" not in _cache:
        g = torch.Generator().manual_seed(1234 + rank)
        _cache["x"] = torch.randn(TOKENS, HIDDEN, generator=g).bfloat16()
        _cache["idx"] = torch.rand(TOKENS, EXPERTS, generator=g).topk(TOPK, dim=1).indices.contiguous()
        _cache["w"] = torch.rand(TOKENS, TOPK, generator=g)
    return _cache["x"], _cache["idx"], _cache["w"]


def _buffer(strict: bool = False):
    """The rank's Buffer; ``strict``: one with check_consistency (its own, cached too)."""
    from comm import all_to_all

    key = "strict_buf" if strict else "buf"
    if key not in _cache:
        _cache[key] = all_to_all.Buffer(check_consistency=strict)
    return _cache[key]


def _ours(fp8: bool = False, strict: bool = False):
    import ops

    x, idx, w = _inputs(dist.get_rank())
    buf = _buffer(strict)
    payload = ops.per_token_cast_to_fp8(x) if fp8 else x
    recv_x, _, _, _, handle, _ = buf.dispatch(payload, topk_idx=idx, topk_weights=w, num_experts=EXPERTS)
    if fp8:
        return recv_x[0].shape[0]
    buf.combine(recv_x, handle)
    return recv_x.shape[0]


def _ceiling_plan():
    """Split sizes of our dispatch (rows per destination), learned once with a real dispatch."""
    if "plan" not in _cache:
        x, idx, w = _inputs(dist.get_rank())
        _, _, _, _, handle, _ = _buffer().dispatch(x, topk_idx=idx, topk_weights=w, num_experts=EXPERTS)
        _cache["plan"] = (list(handle.send_splits), list(handle.recv_splits))
    return _cache["plan"]


def _ceiling():
    send, recv = _ceiling_plan()
    if "ceil_in" not in _cache:
        _cache["ceil_in"] = torch.randn(sum(send), HIDDEN).bfloat16()
        _cache["ceil_out"] = torch.empty(sum(recv), HIDDEN, dtype=torch.bfloat16)
        _cache["ceil_back"] = torch.empty(sum(send), HIDDEN, dtype=torch.bfloat16)
    dist.all_to_all_single(_cache["ceil_out"], _cache["ceil_in"], recv, send)
    dist.all_to_all_single(_cache["ceil_back"], _cache["ceil_out"], send, recv)
    return sum(recv)


def _naive():
    """One copy per (token, expert) pair: argsort by expert, exchange counts and rows, send back,
    weighted index_add_ per token."""
    x, idx, w = _inputs(dist.get_rank())
    world = dist.get_world_size()
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    rows = x[order // TOPK]
    send = torch.bincount(flat // (EXPERTS // world), minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    send_l, recv_l = send.tolist(), recv.tolist()
    got = torch.empty(sum(recv_l), HIDDEN, dtype=x.dtype)
    dist.all_to_all_single(got, rows, recv_l, send_l)
    back = torch.empty_like(rows)
    dist.all_to_all_single(back, got, send_l, recv_l)
    out = torch.zeros(TOKENS, HIDDEN, dtype=torch.float32)
    out.index_add_(0, order // TOPK, back.float() * w.flatten()[order].unsqueeze(1))
    return sum(recv_l)


def _deepspeed_init() -> None:
    """deepspeed.comm must be initialised (else its all_to_all_single is called on None); it adopts
    the existing gloo process group. Its CPU backend would first JIT-compile a shared-memory op
    (minutes): skipped, as launch/ds_engine.py does."""
    import os
    import sys

    if _cache.get("ds_ready"):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # REFERENCE.md: DeepSpeed's MoE runs on CPU/gloo
    import deepspeed
    import deepspeed.comm.torch

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    rank, world = dist.get_rank(), dist.get_world_size()
    for key, value in (("LOCAL_RANK", rank), ("RANK", rank), ("WORLD_SIZE", world)):
        os.environ.setdefault(key, str(value))
    deepspeed.init_distributed(dist_backend="gloo")
    _cache["ds_ready"] = True


def _deepspeed():
    _deepspeed_init()
    from deepspeed.moe.sharded_moe import _AllToAll

    x, idx, w = _inputs(dist.get_rank())
    capacity = TOKENS * TOPK // EXPERTS  # capacity factor 1.0
    if "ds_slots" not in _cache:
        # DeepSpeed's dispatch mask: slot of each (token, expert) in the expert's capacity, in token
        # order; pairs past the capacity are dropped, as in top-k gating with drop_tokens.
        mask = torch.zeros(TOKENS, EXPERTS, dtype=torch.bool)
        mask[torch.arange(TOKENS).unsqueeze(1), idx] = True
        gate = torch.zeros(TOKENS, EXPERTS)
        gate[torch.arange(TOKENS).unsqueeze(1), idx] = w
        loc = mask.cumsum(0) - 1
        t_i, e_i = (mask & (loc < capacity)).nonzero(as_tuple=True)
        _cache["ds_slots"] = (t_i, e_i * capacity + loc[t_i, e_i], gate[t_i, e_i].unsqueeze(1))
    t_i, slot, gate = _cache["ds_slots"]
    dispatched = x.new_zeros(EXPERTS * capacity, HIDDEN).index_copy_(0, slot, x[t_i])  # [E*C, H]
    out = _AllToAll.apply(dist.group.WORLD, dispatched.view(EXPERTS, capacity, HIDDEN))
    back = _AllToAll.apply(dist.group.WORLD, out)  # (the experts would run in between)
    combined = torch.zeros(TOKENS, HIDDEN).index_add_(0, t_i, back.view(-1, HIDDEN)[slot].float() * gate)
    combined.to(x.dtype)
    return EXPERTS * capacity  # rows received per rank: E/R experts x C slots x R sources


IMPLS = {"ours": _ours, "ceiling": _ceiling, "naive": _naive, "deepspeed": _deepspeed,
         "ours_fp8_dispatch": lambda: _ours(fp8=True), "ours_strict": lambda: _ours(strict=True)}


def _bf16_dispatch_only():
    x, idx, w = _inputs(dist.get_rank())
    recv_x, *_ = _buffer().dispatch(x, topk_idx=idx, topk_weights=w, num_experts=EXPERTS)
    return recv_x.shape[0]


IMPLS["ours_bf16_dispatch"] = _bf16_dispatch_only


def timed_rounds(rank: int, world: int, impls: tuple[str, ...], rounds: int) -> tuple[dict, dict]:
    """Per-round wall time of the slowest rank (barrier before each round) and rows received, for
    each entry of ``impls``; their rounds interleave (A B A B ...), so that the machine's drift
    touches each alike."""
    fns = {impl: IMPLS[impl] for impl in impls}
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    rows: dict[str, int] = {}
    for _ in range(rounds):
        for impl, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            rows[impl] = fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[impl].append(float(t))
    return times, rows


def overlap_rounds(rank: int, world: int, which: str, rounds: int) -> dict:
    """comm alone, compute alone, and both overlapped (async comm + matmul + wait), medians."""
    x, idx, w = _inputs(rank)
    buf = _buffer()
    send, recv = _ceiling_plan()
    src = torch.randn(sum(send), HIDDEN).bfloat16()
    dst = torch.empty(sum(recv), HIDDEN, dtype=torch.bfloat16)

    def comm(async_op: bool):
        if which == "ours":
            *_, event = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=EXPERTS, async_finish=async_op)
            return event
        return dist.all_to_all_single(dst, src, recv, send, async_op=async_op)

    def median(fn) -> float:
        ts = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ts.append(float(t))
        return sorted(ts)[len(ts) // 2]

    comm(False)
    t_comm = median(lambda: comm(False))
    # a matmul sized to about the comm's duration
    a = torch.randn(1024, 1024)
    t0 = time.perf_counter()
    a @ a
    unit = max(time.perf_counter() - t0, 1e-4)
    reps = max(1, int(t_comm / unit))
    t_compute = median(lambda: [a @ a for _ in range(reps)])

    def both():
        handle = comm(True)
        for _ in range(reps):
            a @ a
        if which == "ours":
            handle.current_stream_wait()
        else:
            handle.wait()

    t_both = median(both)
    return {"comm": t_comm, "compute": t_compute, "both": t_both, "factor": t_both / max(t_comm, t_compute)}


def _replay(benchmark, times: list[float]) -> None:
    """Records the ranks' per-round times as this benchmark's rounds: pytest-benchmark reads its
    timer twice per round (start, end); the timer below returns 0 then the round's time."""
    readings = iter([x for t in times for x in (0.0, t)])

    def replayed_rank_times() -> float:
        return next(readings)

    benchmark._timer = replayed_rank_times  # pytest-benchmark's timer, fed the ranks' times
    benchmark.pedantic(lambda: None, rounds=len(times), iterations=1, warmup_rounds=0)


PAIRED, PAIRED_ROUNDS = ("ours", "ceiling"), 11
_paired: dict = {}


def _rounds(impl: str) -> tuple[list[float], int]:
    """The rounds of ``impl``: ours and the ceiling are timed together, interleaved, in one pool
    call (the first of their two tests runs it, the second reuses it), since their ratio is the
    tight target; the other peers alone."""
    if impl in PAIRED:
        if not _paired:
            _paired.update(zip(("times", "rows"), run_distributed(timed_rounds, WORLD, PAIRED, PAIRED_ROUNDS,
                                                                  timeout=420)[0], strict=True))
        return _paired["times"][impl], _paired["rows"][impl]
    times, rows = run_distributed(timed_rounds, WORLD, (impl,), ROUNDS, timeout=420)[0]
    return times[impl], rows[impl]


ROLE = {"ours": "ours", "ceiling": "ceiling", "naive": "peer", "deepspeed": "peer"}


@pytest.mark.parametrize("impl", [pytest.param("ours", marks=pytest.mark.quick),
                                  pytest.param("ceiling", marks=pytest.mark.quick),
                                  pytest.param("naive", marks=pytest.mark.quick), "deepspeed"])
def test_dispatch_combine(benchmark, impl: str) -> None:
    if impl == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except Exception as err:  # any import failure means the peer cannot run here
            pytest.skip(f"deepspeed not importable: {err}")
    try:
        times, rows = _rounds(impl)
    except Exception as err:
        if impl != "deepspeed":
            raise
        pytest.skip(f"deepspeed peer failed on the ranks: {str(err)[-300:]}")
    benchmark.group = f"dispatch+combine {TOKENS}x{HIDDEN} bf16 top{TOPK}/{EXPERTS} {WORLD} gloo ranks"
    # received bytes per rank, both directions (dispatch receives rows, combine receives them back)
    benchmark.extra_info.update(role=ROLE[impl], work=2 * rows * HIDDEN * 2, unit="B")
    _replay(benchmark, times)


STRICT_PAIR, STRICT_ROUNDS = ("ours", "ours_strict"), 9
_strict_pair: dict = {}


@pytest.mark.parametrize("mode", ["default", pytest.param("strict", marks=pytest.mark.quick)])
def test_strict_mode_cost(benchmark, mode: str) -> None:
    """What check_consistency costs: the same dispatch+combine with the strict check (the
    combine's blocking round trip) against the default mode, rounds interleaved in one call.
    Ratio below 1: the strict mode is that much slower."""
    if not _strict_pair:
        _strict_pair.update(zip(("times", "rows"), run_distributed(timed_rounds, WORLD, STRICT_PAIR, STRICT_ROUNDS,
                                                                   timeout=420)[0], strict=True))
    impl = "ours_strict" if mode == "strict" else "ours"
    benchmark.group = f"dispatch+combine with check_consistency vs default {TOKENS}x{HIDDEN} {WORLD} gloo ranks"
    rows = _strict_pair["rows"][impl]
    benchmark.extra_info.update(role="ours" if mode == "strict" else "peer", work=2 * rows * HIDDEN * 2, unit="B")
    _replay(benchmark, _strict_pair["times"][impl])


@pytest.mark.parametrize("dtype", [pytest.param("fp8", marks=pytest.mark.quick), "bf16"])
def test_fp8_dispatch(benchmark, dtype: str) -> None:
    impl = "ours_fp8_dispatch" if dtype == "fp8" else "ours_bf16_dispatch"
    times, rows = (part[impl] for part in run_distributed(timed_rounds, WORLD, (impl,), ROUNDS, timeout=600)[0])
    benchmark.group = f"dispatch fp8 vs bf16 {TOKENS}x{HIDDEN} {WORLD} gloo ranks"
    per_row = HIDDEN + 4 * HIDDEN // 128 if dtype == "fp8" else 2 * HIDDEN
    benchmark.extra_info.update(role="ours" if dtype == "fp8" else "peer", work=rows * per_row, unit="B")
    _replay(benchmark, times)


@pytest.mark.parametrize("which", [pytest.param("ours", marks=pytest.mark.quick),
                                   pytest.param("torch", marks=pytest.mark.quick)])
def test_overlap(benchmark, which: str) -> None:
    res = run_distributed(overlap_rounds, WORLD, which, ROUNDS, timeout=600)[0]
    # The recorded value is the overlap factor total / max(comm, compute) (unitless, lower is
    # better), so the ratio table compares factors, not the two different comm sizes.
    benchmark.group = f"overlap factor (value = total/max(comm,compute), not seconds), {WORLD} gloo ranks"
    benchmark.extra_info.update(role="ours" if which == "ours" else "peer", overlap_factor=round(res["factor"], 3),
                                comm_s=res["comm"], compute_s=res["compute"])
    print(f"\noverlap {which}: comm {res['comm'] * 1e3:.1f} ms, compute {res['compute'] * 1e3:.1f} ms, "
          f"both {res['both'] * 1e3:.1f} ms, factor {res['factor']:.3f}")
    _replay(benchmark, [res["factor"]])
