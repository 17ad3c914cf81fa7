"""comm.memory.output: the cached memory behind recv_x / combined_x.

The rule under test: memory that any live tensor still references (the returned tensor, a view,
detach(), a numpy array, set_() onto its storage, a saved autograd tensor) is never handed out
again; memory nothing references is reused (the reuse is what makes dispatch/combine fast, so
it is tested too: without it every call pays first-touch page faults again).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from comm import memory
from tests.harness.tensors import randn

SHAPE = (512, 1024)  # 2 MiB of float32: above the size the cache bothers with


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.fixture(autouse=True)
def fresh_cache():
    memory.empty_cache()
    yield
    memory.empty_cache()


def test_output_is_a_plain_contiguous_tensor_of_the_requested_shape() -> None:
    out = memory.output(SHAPE, torch.bfloat16, torch.device("cpu"))
    assert out.shape == SHAPE and out.dtype == torch.bfloat16 and out.is_contiguous() and out._base is None
    assert out.storage_offset() == 0


def test_memory_held_by_the_caller_is_never_handed_out_again() -> None:
    first = memory.output(SHAPE, torch.float32, "cpu")
    first.copy_(randn(*SHAPE))
    kept = first.clone()
    second = memory.output(SHAPE, torch.float32, "cpu")
    assert not _overlap(_span(first), _span(second))
    second.fill_(float("nan"))
    assert torch.equal(first, kept)


def test_memory_nothing_references_is_reused() -> None:
    first = memory.output(SHAPE, torch.float32, "cpu")
    span = _span(first)
    del first
    again = memory.output((SHAPE[0] - 3, SHAPE[1]), torch.float32, "cpu")  # routing varies sizes a little
    assert _span(again) == span


def _saved_by_autograd(t: torch.Tensor) -> object:
    leaf = torch.ones(SHAPE, requires_grad=True)
    return leaf * t  # mul saves t for the backward


HOLDERS: dict[str, Callable[[torch.Tensor], object]] = {
    "view": lambda t: t[1:, 3:],
    "detach": lambda t: t.detach(),
    "numpy": lambda t: t.numpy(),
    "storage": lambda t: t.untyped_storage(),
    "set_": lambda t: torch.empty(0).set_(t.untyped_storage(), 0, (4,)),
    "autograd": _saved_by_autograd,
    "reshape": lambda t: t.view(-1),
}


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_any_reference_to_the_memory_keeps_it_from_reuse(holder: str) -> None:
    out = memory.output(SHAPE, torch.float32, "cpu")
    out.copy_(randn(*SHAPE))
    span, kept = _span(out), out.clone()
    ref = HOLDERS[holder](out)
    del out
    for _ in range(3):
        other = memory.output(SHAPE, torch.float32, "cpu")
        assert not _overlap(span, _span(other)), f"memory still held through {holder} was handed out again"
        other.fill_(float("nan"))
    del ref
    assert _span(memory.output(SHAPE, torch.float32, "cpu")) == span  # released once the holder is gone
    del kept


def test_a_held_small_storage_is_not_given_to_a_much_larger_request_and_vice_versa() -> None:
    big = memory.output(SHAPE, torch.float32, "cpu")
    big_span = _span(big)
    del big
    small = memory.output((SHAPE[0] // 4, SHAPE[1]), torch.float32, "cpu")  # best fit within 2x only
    assert _span(small) != big_span


def test_the_cache_is_bounded_and_empty_cache_frees_unreferenced_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = SHAPE[0] * SHAPE[1] * 4
    monkeypatch.setattr(memory, "MAX_CACHED_OUTPUT_BYTES", 3 * nbytes)
    held = [memory.output(SHAPE, torch.float32, "cpu") for _ in range(5)]  # beyond the cap: plain tensors
    assert sum(b.numel() for b in memory._cached) <= 3 * nbytes
    spans = [_span(t) for t in held]
    assert all(not _overlap(a, b) for i, a in enumerate(spans) for b in spans[i + 1:])
    del held
    memory.empty_cache()
    assert memory._cached == []


def test_small_requests_bypass_the_cache() -> None:
    small = memory.output((4, 4), torch.float32, "cpu")
    assert small.shape == (4, 4) and memory._cached == []
