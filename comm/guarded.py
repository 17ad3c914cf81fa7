"""All-to-alls that carry the error agreement with them, instead of a round trip before them.

Why: a rank whose input is bad must neither skip a collective its peers have entered (they would
block until the backend's timeout) nor let them finish as if nothing happened: every rank must
raise. The plain way is a round trip of error flags BEFORE the exchange; on the CPU (4 gloo ranks
on 2 cores) that round trip cost 5-9 ms of a ~120 ms combine, because every rank stops until the
slowest one has arrived. Here the flags travel in a tiny header all-to-all launched together with
the exchanges, asynchronously, so its latency hides under the payload's:

- a rank with good input launches the header and its exchanges at once, without waiting; after
  they complete it reads the flags it received and, if a peer flagged, raises
  ``CollectiveInputError`` (its outputs then hold garbage; nothing is left in flight);
- a rank with bad input launches the header with its flag set, waits for its peers' headers, and
  takes part in every exchange they launched with exactly the byte counts they announced (dummy
  bytes: it needs neither its bad arguments nor a valid handle), so no peer blocks; then it raises
  its own exception.

Header row sent to peer p (int64): [error flag, then per exchange j: launched (0/1), bytes this
rank sends p, bytes it expects from p]. The number of exchanges is fixed by the call (e.g. a
combine has two: the rows and the optional top-k weights), so it is the same on every rank.

Arguments each rank checks alone cannot show that the ranks disagree (x's dtype, hidden size or
form, num_experts, the top-k width). A dispatch without a handle makes a round trip anyway (its
count exchange), so ``CallSignature`` rides on it and every rank raises before any payload moves.
A dispatch with a handle or a combine whose ranks disagree (handles from two different
dispatches, different hidden sizes or dtypes, top-k weights on some ranks only) is caught only
in the strict mode (``strict``: ``Buffer(check_consistency=True)`` or ``DSV3_COMM_CHECK=1``):
the headers are then all-gathered and checked BEFORE any payload is launched (one blocking
round trip), so every rank raises ``CollectiveInputError`` naming the pair of ranks. Without it
their header travels WITH the payload, and a size mismatch is fatal before any header could be
read (gloo aborts the process; NCCL may hang or corrupt).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from comm.primitives import CollectiveInputError, launch_all_to_all, raise_if_flagged

__all__ = ["CallSignature", "Exchange", "Guard", "SignatureField", "check_headers", "fail_guarded", "launch_guarded"]


class Guard(enum.IntEnum):
    """How a flat-mode exchange agrees on errors: not at all, through a header launched with the
    payload (no round trip), or strictly (headers gathered and checked before the payload)."""

    OFF = 0
    HEADER = 1
    STRICT = 2


@dataclass(frozen=True)
class SignatureField:
    """One argument every rank must pass alike, as an int; ``labels[value]`` names a coded value
    (a dtype, a form) in the error message."""

    name: str
    value: int
    labels: tuple[str, ...] | None = None

    def describe(self, value: int) -> str:
        return self.labels[value] if self.labels is not None and 0 <= value < len(self.labels) else str(value)


@dataclass(frozen=True)
class CallSignature:
    """The arguments of one collective call that must agree across ranks. Two dtypes of one size
    or two expert counts would give silent garbage, two row sizes a gloo abort: ``check`` turns
    either into CollectiveInputError on every rank (each rank compares all rows, so if any two
    differ, every rank sees a row unlike its own)."""

    what: str
    fields: tuple[SignatureField, ...]

    def values(self) -> list[int]:
        return [f.value for f in self.fields]

    def check(self, rows: list[list[int]]) -> None:
        """Raises CollectiveInputError naming the first field whose value differs between ranks
        (``rows[r]``: rank r's ``values()``)."""
        for j, field in enumerate(self.fields):
            seen = [row[j] for row in rows]
            if len(set(seen)) > 1:
                ranks_by_value: dict[int, list[int]] = {}
                for rank, value in enumerate(seen):
                    ranks_by_value.setdefault(value, []).append(rank)
                detail = "; ".join(f"{field.describe(v)} on rank(s) {rs}" for v, rs in ranks_by_value.items())
                raise CollectiveInputError(f"{self.what} aborted on every rank: the ranks passed different "
                                           f"{field.name}: {detail}")


@dataclass(frozen=True)
class Exchange:
    """One variable-size all-to-all along dim 0: ``out`` receives out_splits[r] rows from rank r,
    ``inp`` sends in_splits[r] rows to rank r."""

    out: torch.Tensor
    inp: torch.Tensor
    out_splits: Sequence[int]
    in_splits: Sequence[int]

    def row_bytes(self) -> int:
        return math.prod(self.out.shape[1:]) * self.out.element_size()

    def launch(self, group: dist.ProcessGroup | None) -> dist.Work:
        """Starts the exchange alone (no error agreement) and returns its work handle."""
        return launch_all_to_all(self.out, self.inp, self.out_splits, self.in_splits, group, async_op=True)


def _header_exchange(rows: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, dist.Work]:
    recv = torch.empty_like(rows)
    return recv, dist.all_to_all_single(recv, rows, group=group, async_op=True)


def _gathered_headers(header: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Strict mode: every rank's header on every rank, [R (sender), R (peer), columns] (blocking)."""
    parts = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, header, group=group)
    return torch.stack(parts).cpu()


def check_headers(table: torch.Tensor, what: str) -> None:
    """Strict mode: raises CollectiveInputError if a rank flagged its input, or if two ranks
    disagree on an exchange (one launches it and the other not, or the bytes one sends the other
    are not the bytes the other expects). Every rank holds the same table, so every rank reaches
    the same verdict before any payload moves."""
    raise_if_flagged(table[:, 0, 0].tolist(), None, what)
    for j in range((table.shape[2] - 1) // 3):
        launched, sends, expects = (table[:, :, c + 3 * j] for c in (1, 2, 3))
        odd = (launched != launched.T).nonzero().tolist()
        if odd:
            on, off = odd[0] if launched[odd[0][0], odd[0][1]] else odd[0][::-1]
            raise CollectiveInputError(
                f"{what} aborted on every rank: rank {on} launches exchange {j} and rank {off} does not (an optional "
                "tensor, such as combine's topk_weights, passed on some ranks only)")
        bad = ((sends != expects.T) & (launched == 1)).nonzero().tolist()
        if bad:
            r, p = bad[0]
            raise CollectiveInputError(
                f"{what} aborted on every rank: in exchange {j} rank {r} sends rank {p} {int(sends[r, p])} bytes, but "
                f"rank {p} expects {int(expects[p, r])} (ranks passed different hidden sizes or dtypes, or handles "
                "of different dispatches)")


def launch_guarded(
    exchanges: Sequence[Exchange | None], group: dist.ProcessGroup | None, what: str, device: torch.device,
    strict: bool = False,
) -> tuple[dist.Work | None, list[dist.Work | None], Callable[[], None] | None]:
    """On a rank whose input is good: launches the header, then every exchange that is not None,
    all asynchronously and in order. ``strict``: the headers are gathered and checked first
    (check_headers, blocking), then the exchanges are launched.

    Returns (header work or None, the work of each exchange (None where the exchange is None),
    check or None). Call ``check()`` once every work has been waited on: it raises
    ``CollectiveInputError`` if a peer rejected its input."""
    num_ranks = dist.get_world_size(group)
    header = torch.zeros((num_ranks, 1 + 3 * len(exchanges)), dtype=torch.int64)
    for j, ex in enumerate(exchanges):
        if ex is not None:
            width = ex.row_bytes()
            header[:, 1 + 3 * j] = 1
            header[:, 2 + 3 * j] = torch.tensor([int(s) * width for s in ex.in_splits], dtype=torch.int64)
            header[:, 3 + 3 * j] = torch.tensor([int(s) * width for s in ex.out_splits], dtype=torch.int64)
    if strict:
        check_headers(_gathered_headers(header.to(device), group), what)
        return None, [None if ex is None else ex.launch(group) for ex in exchanges], None
    recv, header_work = _header_exchange(header.to(device), group)
    works = [None if ex is None else ex.launch(group) for ex in exchanges]

    def check() -> None:
        raise_if_flagged(recv[:, 0].tolist(), None, what)

    return header_work, works, check


def fail_guarded(
    error: BaseException, num_exchanges: int, group: dist.ProcessGroup | None, what: str, device: torch.device,
    strict: bool = False,
) -> NoReturn:
    """On a rank whose input is bad: flags it in the header, takes part in the ``num_exchanges``
    exchanges exactly as the good peers announced them, then raises ``error``. ``strict``: the
    flag reaches the peers before they launch anything, so there is nothing to take part in."""
    num_ranks = dist.get_world_size(group)
    header = torch.zeros((num_ranks, 1 + 3 * num_exchanges), dtype=torch.int64)
    header[:, 0] = 1
    if strict:
        _gathered_headers(header.to(device), group)
        raise error
    recv, header_work = _header_exchange(header.to(device), group)
    header_work.wait()
    peers = recv.cpu().tolist()
    works = []
    for j in range(num_exchanges):
        launched, to_me, from_me = 1 + 3 * j, 2 + 3 * j, 3 + 3 * j
        good = [not row[0] and row[launched] for row in peers]
        if not any(good):  # no peer launched this exchange
            continue
        send = [row[from_me] if g else 0 for row, g in zip(peers, good, strict=True)]
        arrive = [row[to_me] if g else 0 for row, g in zip(peers, good, strict=True)]
        out = torch.empty(sum(arrive), dtype=torch.uint8, device=device)
        inp = torch.zeros(sum(send), dtype=torch.uint8, device=device)
        works.append(dist.all_to_all_single(out, inp, arrive, send, group=group, async_op=True))
    for w in works:
        w.wait()
    raise error
