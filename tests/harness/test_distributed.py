"""The rank pool itself: results by rank, errors re-raised with the rank's traceback, no hang."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness.distributed import RankError, run_distributed


def _all_reduce_rank(rank: int, world_size: int, scale: float) -> float:
    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t.item()


def _fail_on_last(rank: int, world_size: int) -> None:
    if rank == world_size - 1:
        raise ValueError(f"boom on rank {rank}")
    dist.barrier()  # the other ranks wait here; the pool must not hang on them


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_collective_results_come_back_by_rank(world_size: int) -> None:
    scale = torch.rand(()).item() + 0.5
    out = run_distributed(_all_reduce_rank, world_size, scale)
    expected = scale * world_size * (world_size - 1) / 2
    assert out == pytest.approx([expected] * world_size)


def test_rank_exception_is_reraised_with_traceback() -> None:
    with pytest.raises(RankError, match=r"rank 2 of 3 raised:(.|\n)*ValueError: boom on rank 2"):
        run_distributed(_fail_on_last, 3, timeout=90)
    # the pool is rebuilt for the next task
    assert run_distributed(_all_reduce_rank, 3, 1.0) == pytest.approx([3.0] * 3)
