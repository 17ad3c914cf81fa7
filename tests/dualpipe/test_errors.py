"""Bad input raises a clear error on every rank, without a hang, and the pipeline still works after."""

from __future__ import annotations

import torch
from torch import nn

import ops
from dualpipe import DualPipe, DualPipeV
from tests.dualpipe.stages import DIM, Stage, criterion, make_stages, reference
from tests.harness.distributed import run_distributed


class DictStage(Stage):
    """Returns a dict (not a Tensor or tuple of Tensors) after its first ``ok_calls`` calls."""

    ok_calls = 1

    def forward(self, x):
        self.n = getattr(self, "n", 0) + 1
        return {"x": x} if self.n > self.ok_calls else super().forward(x)


class ComplexStage(Stage):
    """Returns a complex128 tensor (no P2P dtype code) from its second call on: a Tensor, so it
    passes the executor's output check, and fails only when its send encodes the header."""

    def forward(self, x):
        self.n = getattr(self, "n", 0) + 1
        out = super().forward(x)
        return out.to(torch.complex128) if self.n > 1 else out


def _attempt(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return "none", ""


def errors_worker(rank: int, world: int, seed: int) -> dict[str, tuple[str, str] | float]:
    N = world
    res: dict[str, tuple[str, str] | float] = {}
    stages = make_stages(seed, 2 * N)
    g = torch.Generator().manual_seed(seed)  # the same batch on every rank (for the reference)
    x = torch.randn(4 * N, DIM, dtype=torch.float64, generator=g)
    y = torch.randn(4 * N, DIM, dtype=torch.float64, generator=g)
    pipe = DualPipeV((stages[rank], stages[2 * N - 1 - rank]))
    first = rank == 0

    def step(chunks=2 * N, crit=criterion, inputs=None, stage_pipe=pipe):
        if first:
            return stage_pipe.step(x if inputs is None else inputs, num_chunks=chunks, criterion=crit, labels=(y,))
        return stage_pipe.step(num_chunks=chunks) if inputs is None else stage_pipe.step(inputs, num_chunks=chunks)

    res["too_few_chunks"] = _attempt(lambda: step(chunks=2 * N - 1))
    res["missing_criterion"] = _attempt(lambda: step(crit=None))
    res["different_chunks"] = _attempt(lambda: step(chunks=2 * N + rank))
    res["inputs_on_wrong_rank"] = _attempt(lambda: step(inputs=x) if rank == N - 1 and N > 1 else step())
    # A stage on the last rank returns a dict mid-schedule (after its first forward).
    bad = make_stages(seed, 2 * N)
    if rank == N - 1:
        bad[2 * N - 1 - rank] = DictStage()
        bad[2 * N - 1 - rank].load_state_dict(stages[2 * N - 1 - rank].state_dict())
    bad_pipe = DualPipeV((bad[rank], bad[2 * N - 1 - rank]))
    res["wrong_stage_output"] = _attempt(lambda: step(stage_pipe=bad_pipe))
    # The same mid-schedule failure in a second step, after a good one: transfers are then single
    # messages of the cached size, and the aborts must take their place size for size.
    bad = make_stages(seed, 2 * N)
    if rank == N - 1:
        bad[2 * N - 1 - rank] = DictStage()
        bad[2 * N - 1 - rank].ok_calls = 2 * N + 1  # the whole first step, then one more forward
        bad[2 * N - 1 - rank].load_state_dict(stages[2 * N - 1 - rank].state_dict())
    bad_pipe = DualPipeV((bad[rank], bad[2 * N - 1 - rank]))
    res["first_step_ok"] = _attempt(lambda: step(stage_pipe=bad_pipe))
    res["wrong_output_second_step"] = _attempt(lambda: step(stage_pipe=bad_pipe))
    # A stage on the first rank returns what no P2P header can describe, mid-schedule: the refused
    # send must still reach its receiver as an abort.
    bad = make_stages(seed, 2 * N)
    if rank == 0:
        bad[0] = ComplexStage()
        bad[0].load_state_dict(stages[0].state_dict())
    res["unsendable_dtype"] = _attempt(lambda: step(stage_pipe=DualPipeV((bad[rank], bad[2 * N - 1 - rank]))))
    res["odd_dualpipe"] = _attempt(lambda: DualPipe((stages[0], stages[1])).step(num_chunks=2 * N))
    # The same pipeline still trains correctly after all of that.
    for m in pipe.module:
        m.zero_grad(set_to_none=True)
    _loss, _ = step()
    xs, ys = torch.tensor_split(x, 2 * N), torch.tensor_split(y, 2 * N)
    _, ref = reference(stages, xs, ys)
    diffs = [ops.calc_diff(p.grad, g) for p, g in zip(stages[rank].parameters(), ref[rank], strict=True)]
    res["after_errors"] = max(diffs)
    return res


def test_bad_input_raises_on_every_rank_and_pipeline_recovers() -> None:
    world = 3
    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_distributed(errors_worker, world, seed, timeout=120)
    for rank, res in enumerate(results):
        kind, msg = res["too_few_chunks"]
        assert kind == "ValueError" and "num_chunks >= 2 * num_ranks" in msg, (rank, res)
        kind, msg = res["missing_criterion"]
        assert kind == "ValueError" and "criterion is required on pipeline rank 0" in msg, (rank, res)
        kind, msg = res["different_chunks"]
        assert kind == "ValueError" and "same num_chunks" in msg, (rank, res)
        kind, msg = res["inputs_on_wrong_rank"]
        assert kind == "ValueError" and "does not run stage 0" in msg, (rank, res)
        kind, msg = res["wrong_stage_output"]
        assert kind in ("TypeError", "RuntimeError") and "must return a Tensor" in msg, (rank, res)
        if rank == world - 1:
            assert kind == "TypeError", res
        assert res["first_step_ok"] == ("none", ""), (rank, res)
        kind, msg = res["wrong_output_second_step"]
        assert kind in ("TypeError", "RuntimeError") and "must return a Tensor" in msg, (rank, res)
        kind, msg = res["unsendable_dtype"]
        assert kind in ("TypeError", "RuntimeError") and "cannot send a tensor of dtype torch.complex128" in msg, (
            rank, res)
        if rank == 0:
            assert kind == "TypeError", res
        kind, msg = res["odd_dualpipe"]
        assert kind == "ValueError" and "even num_ranks" in msg, (rank, res)
        assert res["after_errors"] < 1e-10, (rank, res)


def test_constructor_rejects_wrong_module_count() -> None:
    import pytest

    with pytest.raises((TypeError, RuntimeError)):
        DualPipeV(nn.Linear(2, 2))
