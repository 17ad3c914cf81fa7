"""EventOverlap's wait path: pooled scratch buffers go back to the pool exactly once, whatever fails.

Fake works stand in for torch.distributed ones (a backend's wait raises when a peer died or timed
out), so these need no processes. The events come from ``transfer._complete``, the function every
dispatch and combine builds its event with, and the buffers from the real pool (comm/memory.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from comm import memory, transfer
from comm.events import EventOverlap

NBYTES = 3 << 20  # above the size the pool bothers with


class FakeWork:
    """A work handle whose wait() records itself in ``log`` and raises ``error`` if given."""

    def __init__(self, name: str, log: list[str], error: BaseException | None = None):
        self.name, self.log, self.error = name, log, error

    def wait(self) -> bool:
        self.log.append(f"wait {self.name}")
        if self.error is not None:
            raise self.error
        return True

    def is_completed(self) -> bool:
        return True


def _pooled(log: list[str]) -> tuple[torch.Tensor, Callable[[], None]]:
    """A scratch buffer from the real pool, with a release that is logged."""
    buf, release = memory.scratch(NBYTES, torch.device("cpu"))

    def logged() -> None:
        log.append("release")
        release()

    return buf, logged


def _held(buf: torch.Tensor) -> bool:
    """Whether the pool still counts ``buf``'s slot as handed out."""
    slots = [s for s in memory._pool if s.data.data_ptr() == buf.data_ptr()]
    assert len(slots) == 1, "the buffer should come from the pool"
    return slots[0].busy


def _failing_event(where: str, log: list[str], error: Exception, async_finish: bool = True):
    """A pooled buffer and a function making the event of three exchanges, one of which fails:
    its wait (``where="wait"``), the error check after the waits, or the first finishing step."""
    buf, release = _pooled(log)
    works = [FakeWork("header", log), FakeWork("side", log, error if where == "wait" else None),
             FakeWork("main", log)]

    def fail() -> None:
        log.append(f"failing {where}")
        raise error

    check = fail if where == "check" else None
    steps = ([fail] if where == "step" else []) + [lambda: log.append("step")]
    return buf, lambda: transfer._complete(works, check, steps, [release], async_finish)


@pytest.mark.parametrize("where", ["wait", "check", "step"])
def test_a_failure_returns_the_pooled_buffer_once_and_propagates_the_error_unchanged(where: str) -> None:
    log: list[str] = []
    error = RuntimeError(f"peer died ({torch.randint(0, 1000, ()).item()})")
    buf, make = _failing_event(where, log, error)
    event = make()
    assert _held(buf), "an async event holds its buffer until it is waited on"
    with pytest.raises(RuntimeError) as raised:
        event.current_stream_wait()
    assert raised.value is error
    assert not _held(buf)
    assert log.count("release") == 1 and "step" not in log, "no step runs after a failure"
    assert log[-1] == "release" and log[:3] == ["wait header", "wait side", "wait main"]
    # The buffer is the pool's again: the next request gets it (nothing else holds a slot).
    again, release_again = memory.scratch(NBYTES, torch.device("cpu"))
    assert again.data_ptr() == buf.data_ptr()
    release_again()
    # A second wait (or the context manager's exit) raises the same error and releases nothing.
    with pytest.raises(RuntimeError) as raised_again:
        event.wait()
    assert raised_again.value is error
    assert log.count("release") == 1


def test_a_failed_wait_still_waits_for_the_other_exchanges_before_releasing() -> None:
    """The main exchange may still be writing into its buffer when the header's wait fails: the
    buffer goes back only after its work has finished too (else the next call could get it)."""
    log: list[str] = []
    error = TimeoutError("gloo timed out")
    buf, release = _pooled(log)
    works = [FakeWork("header", log, error), FakeWork("main", log, RuntimeError("connection closed"))]
    event = transfer._complete(works, None, [lambda: log.append("step")], [release], async_finish=True)
    with pytest.raises(TimeoutError) as raised:
        event.current_stream_wait()
    assert raised.value is error, "the first failure propagates, not a later one"
    assert log == ["wait header", "wait main", "release"]
    assert not _held(buf)


def test_a_synchronous_call_that_fails_returns_its_buffer_and_raises() -> None:
    log: list[str] = []
    error = RuntimeError("peer died")
    buf, make = _failing_event("wait", log, error, async_finish=False)
    with pytest.raises(RuntimeError) as raised:
        make()
    assert raised.value is error
    assert log.count("release") == 1 and not _held(buf)


def test_a_successful_wait_runs_the_steps_then_releases_once() -> None:
    log: list[str] = []
    buf, release = _pooled(log)
    event = transfer._complete([FakeWork("main", log)], lambda: log.append("check"), [lambda: log.append("step")],
                               [release], async_finish=True)
    event.then(lambda: log.append("then"))
    with event:
        assert _held(buf)
    event.current_stream_wait()
    assert log == ["wait main", "check", "step", "then", "release"]
    assert not _held(buf)


def test_an_interrupted_wait_keeps_the_buffer_held() -> None:
    """An interrupt leaves exchanges possibly in flight: their buffers are never handed out again
    (the pool's rule for an event nobody waits on) rather than handed out while still written."""
    log: list[str] = []
    buf, release = _pooled(log)
    works = [FakeWork("header", log, KeyboardInterrupt()), FakeWork("main", log)]
    event = EventOverlap(works, [lambda: log.append("step")], [release])
    with pytest.raises(KeyboardInterrupt):
        event.current_stream_wait()
    assert log == ["wait header"]
    assert _held(buf)
    release()  # hand the slot back by hand, for the tests that follow


def test_a_failed_side_wait_in_move_returns_the_send_buffer_after_the_main_exchange(monkeypatch) -> None:
    """A dispatch waits for its small side message at once (wait_side): if that wait raises, the
    main exchange, still reading the pooled send buffer, is waited for before the buffer goes back."""
    log: list[str] = []
    error = RuntimeError(f"side message lost ({torch.randint(0, 1000, ()).item()})")
    works = [FakeWork("side", log, error), FakeWork("main", log)]
    monkeypatch.setattr(transfer, "_launch", lambda exchanges, *args: ([], works, None))
    rows, width = 4, NBYTES // 4 // 2  # main rows big enough for the pool
    x = torch.randn(rows, width, dtype=torch.bfloat16)
    idx = torch.zeros(rows, 1, dtype=torch.int64)
    in_rank = torch.ones(rows, 1, dtype=torch.bool)
    packed = transfer.pack([x], in_rank, (rows,), idx, torch.rand(rows, 1), 1)
    released, real_release = [], packed.release
    monkeypatch.setattr(packed, "release", lambda: (log.append("release"), released.append(True), real_release()))
    with pytest.raises(RuntimeError) as raised:
        transfer.move([x], in_rank, (rows,), (rows,), idx, torch.rand(rows, 1), 1, False, None, wait_side=True,
                      packed=packed)
    assert raised.value is error
    assert log == ["wait side", "wait main", "release"] and released == [True]
