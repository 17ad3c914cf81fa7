"""Run a function on N gloo ranks, reusing worker processes between tests.

Spawning a rank costs seconds (each imports torch), so a ``GlooPool`` of N workers is started
once per world size and kept for the whole pytest session. Each worker joins one gloo process
group on 127.0.0.1 (a free port, a timeout on every collective) and then runs tasks:
``fn(rank, world_size, *args)``, where ``fn`` is a module-level (picklable) function.

If any rank raises or a task passes its timeout, the pool is killed (its process group may be
stuck mid-collective) and the first rank's exception is re-raised with that rank's traceback;
the next task starts a fresh pool. No task can hang the test session.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

DEFAULT_TASK_TIMEOUT = 180.0
COLLECTIVE_TIMEOUT = 60.0


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
        )
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            out = fn(rank, world_size, *args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class GlooPool:
    """``world_size`` long-lived worker processes sharing one gloo process group."""

    def __init__(self, world_size: int, start_timeout: float = 120.0):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._results: mp.Queue = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker_main, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", start_timeout)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TASK_TIMEOUT, **kwargs: Any) -> list[Any]:
        """Runs ``fn(rank, world_size, *args, **kwargs)`` on every rank; returns results by rank."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect("ok", timeout)

    def _collect(self, expected: str, timeout: float) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close(kill=True)
                raise TimeoutError(f"ranks {sorted(pending)} of {self.world_size} did not finish within {timeout:.0f}s")
            try:
                rank, status, payload = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r in pending if not self._procs[r].is_alive()]
                if dead:
                    self.close(kill=True)
                    raise RankError(f"rank(s) {dead} of {self.world_size} died (exit codes "
                                    f"{[self._procs[r].exitcode for r in dead]})") from None
                continue
            if status == "error":
                self.close(kill=True)
                raise RankError(f"rank {rank} of {self.world_size} raised:\n{payload}")
            out[rank] = payload
            pending.discard(rank)
        return out

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


_pools: dict[int, GlooPool] = {}


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TASK_TIMEOUT, **kwargs: Any) -> list[Any]:
    """Runs ``fn(rank, world_size, *args, **kwargs)`` on a reusable pool of ``world_size`` gloo ranks.

    ``fn`` must be importable by the workers (a module-level function). Returns the per-rank
    return values (picklable). Raises ``RankError``/``TimeoutError`` naming the failing rank.
    """
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        pool = _pools[world_size] = GlooPool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    except BaseException:
        _pools.pop(world_size, None)
        raise


@atexit.register
def shutdown_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()
