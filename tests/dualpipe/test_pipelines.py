"""DualPipe, DualPipeV, 1F1B and ZB1P on gloo ranks against a single-process float64 reference.

Every worker builds the same stages and batch from a seed the test draws, runs the pipeline, runs
the same stages in sequence over the same micro-batches, and returns the worst calc_diff of the
losses and of every parameter gradient it holds. Cases are batched per distributed call (the
rank pool is reused) to keep CI time low.
"""

from __future__ import annotations

import pytest
import torch

import ops
from dualpipe import ZB1P, DualPipe, DualPipeV, OneFOneB, WeightGradStore, sum_mirror_grads
from tests.dualpipe.stages import DIM, HookStage, Stage, criterion, make_stages, reference, reference_outputs
from tests.harness.distributed import run_distributed

TOL = 1e-10


def _data(seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, DIM, dtype=torch.float64, generator=g),
            torch.randn(batch, DIM, dtype=torch.float64, generator=g))


def _worst(pairs) -> float:
    return max((ops.calc_diff(a, b) for a, b in pairs), default=0.0)


def _grads(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.full_like(p, float("nan")) for p in m.parameters()]


def dualpipev_worker(rank: int, world: int, cases: list[tuple[int, int, bool, bool]], seed: int) -> list[float]:
    """cases: (num_chunks, batch, split_weights, hook). Returns the worst diff per case."""
    out = []
    for i, (chunks, batch, split, hook) in enumerate(cases):
        n_stages = 2 * world
        cls = HookStage if hook else Stage
        stages = make_stages(seed + i, n_stages, cls, split_weights=split)
        HookStage.calls = []
        pipe = DualPipeV((stages[rank], stages[n_stages - 1 - rank]))
        # Two steps on one pipeline (gradients add up): the second reuses the transfer shapes
        # learned in the first (one message per transfer), or changes them (odd cases: batch+1).
        all_x, all_y = [], []
        for step in range(2):
            x, y = _data(seed + i + 101 * step, batch + step * (i % 2))
            HookStage.calls = []
            if rank == 0:
                loss, outs = pipe.step(x, num_chunks=chunks, criterion=criterion, labels=(y,), return_outputs=True)
            else:
                loss, outs = pipe.step(None, num_chunks=chunks) if i % 2 else pipe.step(num_chunks=chunks)
                assert loss is None and outs is None
            assert WeightGradStore.pending() == 0
            xs, ys = torch.tensor_split(x, chunks), torch.tensor_split(y, chunks)
            all_x += list(xs)
            all_y += list(ys)
        ref_losses, ref_grads = reference(stages, all_x, all_y)
        pairs = list(zip(_grads(stages[rank]), ref_grads[rank], strict=True))
        pairs += list(zip(_grads(stages[n_stages - 1 - rank]), ref_grads[n_stages - 1 - rank], strict=True))
        if rank == 0:  # the last step's losses and outputs
            pairs.append((loss, torch.stack(ref_losses[chunks:])))
            pairs.append((outs, torch.cat(reference_outputs(stages, xs))))
        if hook:  # the hook ran exactly at the schedule's F&B pairs
            expected = [f"F{a.stage}&B{a.bwd[0]}" for a in pipe.schedule(chunks).actions[rank] if a.kind == "FB"]
            assert HookStage.calls == expected and len(expected) > 0, (HookStage.calls, expected)
            assert len(pipe.hook_calls) == len(expected)
        out.append(_worst(pairs))
    return out


def dualpipe_worker(rank: int, world: int, cases: list[tuple[int, int, bool, bool]], seed: int) -> list[float]:
    """DualPipe: rank 0 feeds direction 0 and holds direction 1's labels; rank N-1 the reverse."""
    out = []
    N = world
    for i, (chunks, batch, split, hook) in enumerate(cases):
        cls = HookStage if hook else Stage
        stages = make_stages(seed + i, N, cls, split_weights=split)
        HookStage.calls = []
        pipe = DualPipe((stages[rank], stages[N - 1 - rank]))
        half = chunks // 2
        inputs, labels = [], []
        for step in range(2):  # two steps: gradients add up, the second reuses cached shapes
            x0, y0 = _data(seed + i + 101 * step, batch)  # direction 0: inputs on rank 0, labels on rank N-1
            x1, y1 = _data(seed + i + 7919 + 101 * step, batch + step)  # direction 1: the reverse
            HookStage.calls = []
            if rank == 0:
                loss, outs = pipe.step(x0, num_chunks=chunks, criterion=criterion, labels=(y1,), return_outputs=True)
            elif rank == N - 1:
                loss, outs = pipe.step(x1, num_chunks=chunks, criterion=criterion, labels=(y0,), return_outputs=True)
            else:
                loss, outs = pipe.step(num_chunks=chunks)
                assert loss is None and outs is None
            xs0, ys0 = torch.tensor_split(x0, half), torch.tensor_split(y0, half)
            xs1, ys1 = torch.tensor_split(x1, half), torch.tensor_split(y1, half)
            inputs += list(xs0) + list(xs1)
            labels += list(ys0) + list(ys1)
        sum_mirror_grads(pipe)
        ref_losses, ref_grads = reference(stages, inputs, labels)
        ref_losses = ref_losses[chunks:]  # the last step's
        pairs = list(zip(_grads(stages[rank]), ref_grads[rank], strict=True))
        pairs += list(zip(_grads(stages[N - 1 - rank]), ref_grads[N - 1 - rank], strict=True))
        if rank == 0:
            pairs += [(loss, torch.stack(ref_losses[half:])), (outs, torch.cat(reference_outputs(stages, xs1)))]
        if rank == N - 1:
            pairs += [(loss, torch.stack(ref_losses[:half])), (outs, torch.cat(reference_outputs(stages, xs0)))]
        if hook:
            expected = [f"F{a.stage}&B{a.bwd[0]}" for a in pipe.schedule(chunks).actions[rank] if a.kind == "FB"]
            assert HookStage.calls == expected and len(expected) > 0, (HookStage.calls, expected)
        out.append(_worst(pairs))
    return out


def flat_worker(rank: int, world: int, kind: str, cases: list[tuple[int, int, bool]], seed: int) -> list[float]:
    """1F1B / ZB1P: one stage per rank, inputs on rank 0, loss on rank P-1."""
    out = []
    for i, (chunks, batch, split) in enumerate(cases):
        stages = make_stages(seed + i, world, Stage, split_weights=split)
        pipe = (OneFOneB if kind == "1f1b" else ZB1P)(stages[rank])
        x, y = _data(seed + i, batch)
        args = (x,) if rank == 0 else ()
        kw = {"criterion": criterion, "labels": (y,)} if rank == world - 1 else {}
        loss, _ = pipe.step(*args, num_chunks=chunks, **kw)
        xs, ys = torch.tensor_split(x, chunks), torch.tensor_split(y, chunks)
        ref_losses, ref_grads = reference(stages, xs, ys)
        pairs = list(zip(_grads(stages[rank]), ref_grads[rank], strict=True))
        if rank == world - 1:
            pairs.append((loss, torch.stack(ref_losses)))
        else:
            assert loss is None
        out.append(_worst(pairs))
    return out


def _seed() -> int:
    return int(torch.randint(0, 2**30, ()).item())


# (num_chunks, batch, split_weights, hook); batch not a multiple of the chunks -> uneven last micro-batches
V_CASES = {
    1: [(2, 6, False, False), (3, 7, True, False), (5, 11, False, True)],
    2: [(4, 8, False, False), (5, 13, True, False), (7, 9, True, True)],
    3: [(6, 12, True, False), (8, 19, False, True)],
    4: [(8, 16, True, False), (10, 23, True, True)],
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_dualpipev_matches_sequential_reference(world: int) -> None:
    results = run_distributed(dualpipev_worker, world, V_CASES[world], _seed(), timeout=120)
    for rank, diffs in enumerate(results):
        for case, d in zip(V_CASES[world], diffs, strict=True):
            assert d < TOL, f"rank {rank} case {case}: calc_diff {d}"


D_CASES = {
    2: [(4, 8, False, False), (6, 13, True, False), (8, 17, True, True)],
    4: [(8, 16, True, False), (10, 23, False, True)],
    6: [(12, 25, True, True)],
    8: [(16, 35, True, False)],
}


@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_dualpipe_matches_sequential_reference_after_mirror_sum(world: int) -> None:
    results = run_distributed(dualpipe_worker, world, D_CASES[world], _seed(), timeout=150)
    for rank, diffs in enumerate(results):
        for case, d in zip(D_CASES[world], diffs, strict=True):
            assert d < TOL, f"rank {rank} case {case}: calc_diff {d}"


@pytest.mark.parametrize("kind", ["1f1b", "zb1p"])
def test_flat_schedules_match_sequential_reference(kind: str) -> None:
    for world, cases in [(2, [(3, 7, True), (4, 8, False)]), (4, [(6, 14, True), (2, 5, True)])]:
        results = run_distributed(flat_worker, world, kind, cases, _seed(), timeout=120)
        for rank, diffs in enumerate(results):
            for case, d in zip(cases, diffs, strict=True):
                assert d < TOL, f"{kind} world {world} rank {rank} case {case}: calc_diff {d}"


def inference_worker(rank: int, world: int, seed: int, kind: str) -> tuple[bool, bool, bool]:
    """Forward only (grad disabled): outputs bit-equal to the reference, losses too, no grads."""
    N = world
    chunks, batch = 2 * N + 1 if kind == "v" else 2 * N, 4 * N + 3
    n_stages = 2 * N if kind == "v" else N
    stages = make_stages(seed, n_stages)
    mods = (stages[rank], stages[n_stages - 1 - rank])
    pipe = DualPipeV(mods) if kind == "v" else DualPipe(mods)
    x, y = _data(seed, batch)
    feeds = rank == 0 or (kind == "d" and rank == N - 1)
    with torch.no_grad():
        if feeds:
            loss, outs = pipe.step(x, num_chunks=chunks, criterion=criterion, labels=(y,), return_outputs=True)
        else:
            loss, outs = pipe.step(num_chunks=chunks)
    no_grads = all(p.grad is None for m in mods for p in m.parameters())
    if not feeds:
        return loss is None and outs is None, True, no_grads
    per_dir = chunks if kind == "v" else chunks // 2
    xs, ys = torch.tensor_split(x, per_dir), torch.tensor_split(y, per_dir)
    ref = reference_outputs(stages, xs)
    ref_loss = torch.stack([criterion(o, t) for o, t in zip(ref, ys, strict=True)])
    return torch.equal(outs, torch.cat(ref)), torch.equal(loss, ref_loss), no_grads


@pytest.mark.parametrize("kind,world", [("v", 2), ("v", 4), ("d", 2), ("d", 4)])
def test_inference_returns_reference_outputs_exactly(kind: str, world: int) -> None:
    for rank, (outs_ok, loss_ok, no_grads) in enumerate(run_distributed(inference_worker, world, _seed(), kind, timeout=60)):
        assert outs_ok and loss_ok and no_grads, (rank, outs_ok, loss_ok, no_grads)


def timeline_worker(rank: int, world: int, seed: int, path: str) -> list[tuple[str, float, float]]:
    from dualpipe import to_chrome_trace

    stages = make_stages(seed, 2 * world, Stage, split_weights=True)
    pipe = DualPipeV((stages[rank], stages[2 * world - 1 - rank]))
    pipe.record_timeline = True
    x, y = _data(seed, 4 * world)
    if rank == 0:
        pipe.step(x, num_chunks=2 * world, criterion=criterion, labels=(y,))
    else:
        pipe.step(num_chunks=2 * world)
    timelines = pipe.gather_timeline()
    if rank == 0:
        to_chrome_trace(timelines, path)
    return [(e.label, e.start, e.end) for e in timelines[rank]]


def test_measured_timeline_follows_the_schedule(tmp_path) -> None:
    import json

    from dualpipe import dualpipev_schedule

    world = 4
    path = str(tmp_path / "trace.json")
    results = run_distributed(timeline_worker, world, _seed(), path, timeout=60)
    sched = dualpipev_schedule(world, 2 * world)
    for rank, events in enumerate(results):
        assert [e[0] for e in events] == [str(a) for a in sched.actions[rank]]
        assert all(0 <= s <= e for _, s, e in events)
        assert all(events[i][2] <= events[i + 1][1] for i in range(len(events) - 1))  # one at a time
    with open(path) as f:
        trace = json.load(f)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == sum(len(a) for a in sched.actions)
    assert {e["tid"] for e in spans} == set(range(world))


def tied_worker(rank: int, world: int, seed: int) -> float:
    """DualPipe whose first and last stages share one weight (like an embedding tied to an MTP
    head): ranks 0 and N-1 hold both stages, so that weight appears in both of their modules."""
    import copy

    N = world
    stages = make_stages(seed, N)
    stages[N - 1].lin.weight = stages[0].lin.weight  # one Parameter in two stages
    pipe = DualPipe((stages[rank], stages[N - 1 - rank]))
    chunks, batch, half = 2 * N, 4 * N + 1, N
    x0, y0 = _data(seed, batch)
    x1, y1 = _data(seed + 1, batch)
    if rank == 0:
        pipe.step(x0, num_chunks=chunks, criterion=criterion, labels=(y1,))
    elif rank == N - 1:
        pipe.step(x1, num_chunks=chunks, criterion=criterion, labels=(y0,))
    else:
        pipe.step(num_chunks=chunks)
    sum_mirror_grads(pipe)
    # Reference: one deepcopy of the whole list keeps the tie, so the shared weight's gradient
    # is the sum over both stages and all micro-batches.
    ref = copy.deepcopy(stages)
    for m in ref:
        m.zero_grad(set_to_none=True)
    xs = list(torch.tensor_split(x0, half)) + list(torch.tensor_split(x1, half))
    ys = list(torch.tensor_split(y0, half)) + list(torch.tensor_split(y1, half))
    for x, y in zip(xs, ys, strict=True):
        h = x
        for s in ref:
            h = s(h)
        criterion(h, y).backward()
    pairs = [(p.grad, q.grad) for i in (rank, N - 1 - rank)
             for p, q in zip(stages[i].parameters(), ref[i].parameters(), strict=True)]
    return _worst(pairs)


@pytest.mark.parametrize("world", [2, 4])
def test_sum_mirror_grads_counts_a_tied_parameter_once(world: int) -> None:
    for rank, d in enumerate(run_distributed(tied_worker, world, _seed(), timeout=60)):
        assert d < TOL, f"rank {rank}: calc_diff {d}"


def subgroup_worker(rank: int, world: int, seed: int, chunks: int, batch: int) -> float:
    """Two DualPipeV pipelines at once on sub-groups {0, 2} and {1, 3}; the second maps its group
    ranks to pipeline ranks in reverse (global rank 3 feeds the inputs). P2P is addressed by
    group rank while the pipeline knows global ranks: a wrong conversion mismatches or hangs."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = rank % 2
    mapping = [0, 1] if mine == 0 else [1, 0]
    prank = mapping[dist.get_rank(groups[mine])]
    stages = make_stages(seed + mine, 4, Stage)
    pipe = DualPipeV((stages[prank], stages[3 - prank]), process_group=groups[mine], rank_mapping=mapping)
    assert pipe.rank == prank
    all_x, all_y = [], []
    for step in range(2):  # the second step takes the cached-shape path
        x, y = _data(seed + 7 * mine + 101 * step, batch)
        if prank == 0:
            pipe.step(x, num_chunks=chunks, criterion=criterion, labels=(y,))
        else:
            pipe.step(num_chunks=chunks)
        all_x += list(torch.tensor_split(x, chunks))
        all_y += list(torch.tensor_split(y, chunks))
    _, ref = reference(stages, all_x, all_y)
    return _worst([*zip(_grads(stages[prank]), ref[prank], strict=True),
                   *zip(_grads(stages[3 - prank]), ref[3 - prank], strict=True)])


def test_dualpipev_on_sub_groups_with_a_rank_mapping() -> None:
    seed = _seed()
    res = run_distributed(subgroup_worker, 4, seed, 5, 11, timeout=90)
    assert max(res) < TOL, (res, seed)
