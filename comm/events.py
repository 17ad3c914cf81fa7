"""EventOverlap: the handle an ``async_finish=True`` call returns.

On the CPU (gloo, MPI) it holds torch.distributed work handles, which complete in the backend's
own threads; on CUDA (NCCL) the same handles make the current stream wait on the communication
stream. Either way the call has returned before the data arrived. Waiting runs the call's
finishing steps (unpacking received rows, the FP32 reduction of a combine) exactly once, after
which the tensors the call returned hold their values, and then hands the call's pooled scratch
buffers back (comm/memory.py), exactly once, also when a wait or a step raised: a failed
exchange (a dead peer, a timeout, a peer's bad input) must not keep pool slots busy for the rest
of the process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.distributed as dist

__all__ = ["EventOverlap"]


class EventOverlap:
    """Completion of an asynchronous dispatch/combine (DeepEP's name and methods).

    ``current_stream_wait()`` blocks the caller (CPU) or the current CUDA stream until the
    communication has finished, then fills the returned tensors. ``with event: ...`` runs the
    body (work to overlap) and waits on exit.
    """

    def __init__(self, works: Sequence[dist.Work | None] = (), finish: Sequence[Callable[[], None]] = (),
                 releases: Sequence[Callable[[], None]] = ()):
        """``works``: the exchanges to wait for; ``finish``: steps that need their data (run in
        order, after every work succeeded); ``releases``: functions that hand back the buffers the
        works read or write (comm/memory.py scratch), run once no work touches them any more."""
        self._works = [w for w in works if w is not None]
        self._finish = list(finish)
        self._releases = list(releases)
        self._done = not self._works and not self._finish and not self._releases
        self._error: BaseException | None = None

    def is_complete(self) -> bool:
        """True once the data has arrived (without waiting, and before the finishing steps run)."""
        return self._done or all(w.is_completed() for w in self._works)

    def current_stream_wait(self) -> None:
        """Waits for the communication, then runs the finishing steps (once). If a wait or a step
        raises (a backend error, or CollectiveInputError: a peer rejected its input), the error
        propagates unchanged and every later wait raises it again.

        The releases run exactly once, whatever happened, but only after EVERY work has been
        waited on: when one wait fails, the others are still waited on (their own errors, most
        often the same failure seen from another exchange, give way to the first), since an
        exchange still in flight may write into a buffer the pool would hand to the next call.
        Only an interrupt (KeyboardInterrupt, SystemExit) during the waits leaves the buffers
        held: they are then never reused, the pool's rule for an event nobody waits on."""
        if self._done:
            if self._error is not None:
                raise self._error
            return
        works, finish, releases = self._works, self._finish, self._releases
        self._works, self._finish, self._releases, self._done = [], [], [], True
        settled = False  # every work has finished (its wait returned or raised an Exception)
        try:
            failure = _wait_every(works)
            settled = True
            if failure is not None:
                raise failure
            for fn in finish:
                fn()
        except BaseException as err:
            self._error = err
            raise
        finally:
            if settled:
                for release in releases:
                    release()

    def then(self, fn: Callable[[], None]) -> EventOverlap:
        """Adds a finishing step (runs now if the event has already finished; an event that
        failed raises its error again rather than run ``fn`` on garbage outputs)."""
        if self._done:
            if self._error is not None:
                raise self._error
            fn()
        else:
            self._finish.append(fn)
        return self

    # DeepEP's spelling for the same thing
    def wait(self) -> None:
        self.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()

    @staticmethod
    def wait_all(events: Sequence[EventOverlap | None]) -> None:
        for e in events:
            if e is not None:
                e.current_stream_wait()


def wait_previous(previous_event: EventOverlap | None) -> None:
    """The ``previous_event`` argument of every call: finish it before starting."""
    if previous_event is None:
        return
    if not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")
    previous_event.current_stream_wait()


def _wait_every(works: Sequence[dist.Work]) -> Exception | None:
    """Waits on every work, also after one failed; returns the first failure (None if none).
    An interrupt (a BaseException that is not an Exception) propagates at once."""
    failure: Exception | None = None
    for w in works:
        try:
            w.wait()
        except Exception as err:
            if failure is None:
                failure = err
    return failure
