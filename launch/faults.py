"""Exit codes, signals, and finding the rank that died or hung.

Exit codes of launch/pretrain.py (every rank exits with the same code where it can):
  0  finished
  1  unexpected error (a Python traceback is printed)
  2  bad configuration or data, found before training starts (one-line message)
  3  too many non-finite (NaN/Inf) steps: training.max_nan_skips exceeded
  4  a peer rank died or hung: a collective failed or passed parallel.timeout_s
  5  stopped by SIGTERM/SIGINT after saving a checkpoint (resume with --checkpoint.resume auto)

How a dead or hung rank is noticed: every collective has the configured timeout (gloo and NCCL
raise when it passes, or at once when a peer's connection drops), and a watchdog thread in each
rank exits the process if the training loop makes no progress for longer than the timeout (so a
rank stuck outside collectives also ends). To name the culprit, each rank's watchdog publishes a
heartbeat (wall time, step, time of the loop's last progress) to the rendezvous store every
second; the rank that reports the failure reads them back: a rank whose heartbeat stopped died, a
rank whose progress is oldest hung.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PEER = 4
EXIT_SIGNAL = 5

HEARTBEAT_PERIOD_S = 1.0
DEAD_AFTER_S = 5.0
STORE_LINGER_S = 5.0  # rank 0 (the store's host) waits this long before exiting on a fault


class PeerFailure(RuntimeError):
    """A collective failed or timed out because another rank died or hung."""


class StopSignal:
    """SIGTERM/SIGINT set a flag that the loop all-reduces each step; a second SIGINT exits at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            os._exit(128 + signum)
        self.received = signum


class Watchdog:
    """Publishes heartbeats and kills this process when the loop stalls longer than ``timeout_s``."""

    def __init__(self, rank: int, world: int, timeout_s: float, store_addr: tuple[str, int] | None,
                 run_id: str) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.step = 0
        self.phase = "start-up"
        self.last_progress = time.time()
        self.armed = False  # start-up (imports, building the model) is not timed; steps are
        self.prefix = f"dsv3-hb/{run_id}/"
        self.store = None
        if store_addr is not None and world > 1:
            try:
                self.store = dist.TCPStore(store_addr[0], store_addr[1], is_master=False,
                                           timeout=timedelta(seconds=10), wait_for_workers=False)
            except Exception:  # no store to publish to: the timeout still applies, culprits go unnamed
                self.store = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv3-watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int, phase: str) -> None:
        self.step, self.phase, self.last_progress = step, phase, time.time()
        self.armed = True

    def _publish(self) -> None:
        if self.store is None:
            return
        rec = {"t": time.time(), "step": self.step, "phase": self.phase, "progress": self.last_progress}
        with contextlib.suppress(Exception):
            self.store.set(self.prefix + str(self.rank), json.dumps(rec))

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_PERIOD_S):
            self._publish()
            stalled = time.time() - self.last_progress
            if self.armed and stalled > self.timeout_s + 2 * HEARTBEAT_PERIOD_S:
                msg = (f"rank {self.rank}: no progress for {stalled:.0f}s (> parallel.timeout_s={self.timeout_s:g}) "
                       f"at step {self.step} ({self.phase}); {self.diagnose()}; exiting with code {EXIT_PEER}")
                print(msg, file=sys.stderr, flush=True)
                if self.rank == 0:
                    time.sleep(STORE_LINGER_S)
                os._exit(EXIT_PEER)

    def diagnose(self) -> str:
        """Names the ranks that stopped publishing (dead) or whose loop is oldest (hung)."""
        if self.store is None:
            return "peer status unknown (no rendezvous store)"
        now, dead, seen = time.time(), [], {}
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                self.store.set_timeout(timedelta(seconds=2))
                if not self.store.check([self.prefix + str(r)]):
                    dead.append(r)
                    continue
                seen[r] = json.loads(self.store.get(self.prefix + str(r)))
            except Exception:
                return "the rendezvous store (hosted with rank 0 / the launcher) is unreachable: rank 0 likely died"
            if now - seen[r]["t"] > DEAD_AFTER_S:
                dead.append(r)
        if dead:
            steps = ", ".join(f"rank {r} (last seen at step {seen[r]['step']})" if r in seen else f"rank {r}"
                              for r in dead)
            return f"dead: {steps}"
        if seen:
            r = min(seen, key=lambda k: seen[k]["progress"])
            if now - seen[r]["progress"] > min(self.timeout_s / 2, 30.0):
                return f"hung: rank {r} at step {seen[r]['step']} ({seen[r]['phase']})"
        return "no other rank looks dead or hung"

    def stop(self) -> None:
        self._stop.set()
