"""How the training step time grows: with tokens per batch, with sequence length, with the number
of routed experts, and with the number of data-parallel ranks.

One full step of launch's Trainer (forward, backward, ZeRO-1 AdamW, expert-bias update) of the
tiny preset in float32, a few points per axis; everything else held fixed:

- tokens per batch: batch 2, 4, 8 sequences of 128 tokens (compute grows linearly; a step time
  that grows slower shows fixed per-step costs being amortised);
- sequence length at a constant 1024 tokens per batch: 64, 128, 256 (only attention grows,
  quadratically per sequence, so linearly per token);
- routed experts 4, 8, 16 with 2 active per token and batch 4 x 128: the FLOPs per token are
  unchanged, so the growth is the cost of more, smaller expert GEMMs, of routing, and of the
  optimizer over more parameters;
- data-parallel ranks 1, 2, 4, 8 (weak scaling, 4 sequences per rank), only where the machine has
  a core per rank: with fewer cores it would measure oversubscription, so those points are
  skipped with that reason.

Three points per axis and three timed steps per point (one under ``--quick``) keep the file to a
few minutes on 2 cores.

Each point is recorded with ``extra_info["axis"]`` and ``["x"]``; ``python -m bench.report``
draws a table and a plot per axis. No peer: a curve of ours.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench.bench_train import make_trainer
from tests.harness.distributed import run_distributed

ROUNDS = 3
BASE = ["--model.preset", "tiny", "--training.dtype", "fp32", "--training.steps", "1000"]
_cache: dict = {}


def _rounds(request: pytest.FixtureRequest) -> int:
    return 1 if request.config.getoption("--quick") else ROUNDS  # --quick: the code runs, no curve


def _point(benchmark, tmp: Path, axis: str, x: int, argv: list[str], label: str, rounds: int) -> None:
    with make_trainer(tmp, [*BASE, *argv], measure_peak=False) as trainer:
        t = trainer.cfg.training
        tokens = t.batch_size * t.seq_len
        benchmark.group = f"scaling step time vs {axis} (tiny preset, fp32, {label}) cpu"
        benchmark.extra_info.update(role="ours", axis=axis, x=x, tokens=tokens, batch_size=t.batch_size,
                                    seq_len=t.seq_len, n_routed_experts=trainer.args.n_routed_experts,
                                    work=trainer.flops_per_token * tokens, unit="FLOP")
        trainer.train_step()  # warm-up
        benchmark.pedantic(trainer.train_step, rounds=rounds, iterations=1)


@pytest.mark.parametrize("batch", [2, pytest.param(4, marks=pytest.mark.quick), 8])
def test_tokens_per_batch(benchmark, request, tmp_path: Path, batch: int) -> None:
    _point(benchmark, tmp_path, "tokens per batch", batch * 128,
           ["--training.batch_size", str(batch), "--training.seq_len", "128"], "seq 128", _rounds(request))


@pytest.mark.parametrize("seq", [64, pytest.param(128, marks=pytest.mark.quick), 256])
def test_sequence_length(benchmark, request, tmp_path: Path, seq: int) -> None:
    _point(benchmark, tmp_path, "sequence length", seq,
           ["--training.batch_size", str(1024 // seq), "--training.seq_len", str(seq)], "1024 tokens per batch",
           _rounds(request))


@pytest.mark.parametrize("experts", [4, pytest.param(8, marks=pytest.mark.quick), 16])
def test_routed_experts(benchmark, request, tmp_path: Path, experts: int) -> None:
    _point(benchmark, tmp_path, "routed experts", experts,
           ["--training.batch_size", "4", "--training.seq_len", "128", "--model.n_routed_experts", str(experts)],
           "2 active, batch 4 x seq 128", _rounds(request))


def dp_step_rounds(rank: int, world: int, rounds: int) -> list[float]:
    """Per-round step time of the slowest rank: tiny preset, 4 sequences per rank, ZeRO-1 over
    ``world`` data-parallel ranks (the pool's default process group)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, make_trainer(
        Path(tmp), [*BASE, "--training.batch_size", str(4 * world), "--training.seq_len", "128"], world=world,
        measure_peak=False,
    ) as trainer:
        trainer.train_step()
        times = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t))
    return times


@pytest.mark.parametrize("ranks", [pytest.param(1, marks=pytest.mark.quick), 2, 4, 8])
def test_data_parallel_ranks(benchmark, request, ranks: int) -> None:
    cores = os.cpu_count() or 1
    if ranks > cores:
        pytest.skip(f"rank-count scaling needs a core per rank: {ranks} ranks on {cores} cores would measure "
                    "oversubscription, not scaling")
    times = run_distributed(dp_step_rounds, ranks, _rounds(request), timeout=600)[0]
    benchmark.group = "scaling step time vs data-parallel ranks (tiny preset, fp32, 4 x 128 tokens per rank) cpu"
    benchmark.extra_info.update(role="ours", axis="data-parallel ranks (weak scaling)", x=ranks,
                                tokens=4 * 128 * ranks)
    readings = iter([x for t in times for x in (0.0, t)])  # the ranks' times become the rounds
    benchmark._timer = lambda: next(readings)
    benchmark.pedantic(lambda: None, rounds=len(times), iterations=1, warmup_rounds=0)
