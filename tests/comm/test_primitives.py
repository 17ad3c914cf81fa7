"""all_to_all_v: rows by source rank, FP8 through gloo as bytes, gradient = reverse exchange,
async form; every rank rebuilds every rank's rows, so the reference needs no collective."""

from __future__ import annotations

import random

import pytest
import torch

from comm import all_to_all
from tests.comm.reference import hashed_uniform
from tests.harness.distributed import run_distributed


def _rows(seed: int, src: int, splits: list[list[int]], dst: int, h: int) -> torch.Tensor:
    """Rows src sends dst: a slice of src's hashed input."""
    start = sum(splits[src][:dst])
    return hashed_uniform(seed, src, 0, torch.arange(start, start + splits[src][dst]), h).float()


def exchange(rank: int, world: int, seed: int, splits: list[list[int]], h: int) -> None:
    x = hashed_uniform(seed, rank, 0, torch.arange(sum(splits[rank])), h).float().requires_grad_()
    out_splits = [splits[s][rank] for s in range(world)]
    out = all_to_all.all_to_all_v(x, out_splits, splits[rank])
    want = torch.cat([_rows(seed, s, splits, rank, h) for s in range(world)])
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    # x's gradient: every receiver's g rows come back to their source, in destination order.
    back = all_to_all.all_to_all_v(g, splits[rank], out_splits)
    assert torch.equal(x.grad, back)

    q = x.detach().to(torch.float8_e4m3fn)
    out8, event = all_to_all.all_to_all_v(q, out_splits, splits[rank], async_op=True)
    event.current_stream_wait()
    assert out8.dtype == torch.float8_e4m3fn and torch.equal(out8.view(torch.uint8), want.to(torch.float8_e4m3fn).view(torch.uint8))
    try:
        all_to_all.all_to_all_v(x, out_splits, [1] * (world + 1))
    except ValueError as err:
        assert "input_split_sizes" in str(err)
    else:
        raise AssertionError("bad split sizes accepted")


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_v(world: int) -> None:
    splits = [[random.randint(0, 30) for _ in range(world)] for _ in range(world)]
    run_distributed(exchange, world, random.getrandbits(40), splits, random.choice([1, 33]))
