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
rank sends p, bytes it expects from p, the code of its payload's element type]. The number of
exchanges is fixed by the call (e.g. a combine has two: the rows and the optional top-k
weights), so it is the same on every rank.

Arguments each rank checks alone cannot show that the ranks disagree (x's dtype, hidden size or
form, num_experts, the top-k width). A dispatch without a handle makes a round trip anyway (its
count exchange), so ``CallSignature`` rides on it and every rank raises before any payload moves.
A dispatch with a handle or a combine whose ranks disagree (handles from two different
dispatches, different hidden sizes or dtypes, top-k weights on some ranks only) is caught only
in the strict mode (``strict``: ``Buffer(check_consistency=True)`` or ``DSV3_COMM_CHECK=1``,
the same on every rank): the headers are then all-gathered and checked BEFORE any payload is
launched (one blocking round trip), so every rank raises ``CollectiveInputError`` naming the
pair of ranks (byte counts and element types; the element type also catches bf16 against fp16
rows of one size). Without it
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


# Element types a header names by position (anything else: one shared "other" code).
_DTYPE_CODES = (torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
                torch.int64, torch.int32)
_COLUMNS = 4  # per exchange: launched, bytes sent to the peer, bytes expected from it, dtype code


def _header(num_ranks: int, num_exchanges: int) -> torch.Tensor:
    return torch.zeros((num_ranks, 1 + _COLUMNS * num_exchanges), dtype=torch.int64)


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
    dtype: torch.dtype | None = None  # the payload's element type when out/inp are its bytes

    def row_bytes(self) -> int:
        return math.prod(self.out.shape[1:]) * self.out.element_size()

    def dtype_code(self) -> int:
        dtype = self.out.dtype if self.dtype is None else self.dtype
        return _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else len(_DTYPE_CODES)

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
    disagree on an exchange (one launches it and the other not, the bytes one sends the other
    are not the bytes the other expects, or their element types differ). Every rank holds the
    same table, so every rank reaches the same verdict before any payload moves."""
    raise_if_flagged(table[:, 0, 0].tolist(), None, what)
    for j in range((table.shape[2] - 1) // _COLUMNS):
        launched, sends, expects, dtypes = (table[:, :, c + _COLUMNS * j] for c in (1, 2, 3, 4))
        odd = (launched != launched.T).nonzero().tolist()
        if odd:
            on, off = odd[0] if launched[odd[0][0], odd[0][1]] else odd[0][::-1]
            raise CollectiveInputError(
                f"{what} aborted on every rank: rank {on} launches exchange {j} and rank {off} does not (a part "
                "passed on some ranks only: combine's topk_weights, or a dispatch's (x_fp8, scales) form)")
        both = launched == 1
        mixed = ((dtypes != dtypes.T) & both).nonzero().tolist()
        if mixed:
            r, p = mixed[0]
            names = [str(_DTYPE_CODES[c]) if c < len(_DTYPE_CODES) else "another dtype" for c in (dtypes[r, p],
                                                                                                   dtypes[p, r])]
            raise CollectiveInputError(f"{what} aborted on every rank: in exchange {j} rank {r} sends {names[0]} "
                                       f"and rank {p} sends {names[1]} (ranks passed different dtypes)")
        bad = ((sends != expects.T) & both).nonzero().tolist()
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
    header = _header(dist.get_world_size(group), len(exchanges))
    for j, ex in enumerate(exchanges):
        if ex is not None:
            width, col = ex.row_bytes(), 1 + _COLUMNS * j
            header[:, col] = 1
            header[:, col + 1] = torch.tensor([int(s) * width for s in ex.in_splits], dtype=torch.int64)
            header[:, col + 2] = torch.tensor([int(s) * width for s in ex.out_splits], dtype=torch.int64)
            header[:, col + 3] = ex.dtype_code()
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
    header = _header(dist.get_world_size(group), num_exchanges)
    header[:, 0] = 1
    if strict:
        _gathered_headers(header.to(device), group)
        raise error
    recv, header_work = _header_exchange(header.to(device), group)
    header_work.wait()
    peers = recv.cpu().tolist()
    works = []
    for j in range(num_exchanges):
        launched, to_me, from_me = (c + _COLUMNS * j for c in (1, 2, 3))
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
