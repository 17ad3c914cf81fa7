"""The row transfers under ``Buffer``: pack rows by destination, exchange them, unpack or reduce.

``Buffer`` (comm/buffer.py) checks arguments and decides what to send; this module moves the bytes.
Its three steps, shared by the flat mode and both stages of the node-limited one:

- ``start_count_exchange``: the one small all-to-all of row counts (it also carries every rank's
  error flag and the call's signature) that tells a dispatch how many rows it will receive.
- ``pack`` + ``move`` (dispatch): ``pack`` writes the send side (local work only, so the dispatch
  runs it while its counts travel); ``move`` launches two variable-size all-to-alls at once, a
  small "side" message of packed rows (the FP8 scales, and the top-k made local to the receiver)
  and the main payload (the fp32/bf16/fp16/fp64 rows, or the FP8 rows), whose receive buffer IS
  the returned recv_x: no unpack copy.
- ``send_back`` (combine): each received row goes back straight from the caller's x (its rows are
  already in the order the reverse exchange needs), and the rows from every rank that received a
  token are summed in FP32 (FP64 for float64 rows).

Cost model (CPU, gloo, measured in bench/bench_comm.py): the transfer dominates once the buffers
are right. What used to dominate was first-touch page faults of freshly allocated 60 MB buffers
(several times the cost of the copy that fills them): send and reverse-receive buffers come from a
reused pool, and recv_x / combined_x from cached memory that no tensor references any more
(comm/memory.py: memory the caller still holds is never handed out again). Every small collective
costs one round trip, so there are as few as the API allows: the error agreement rides on the
count exchange (dispatch) or, with ``guarded``, on a header launched with the payload
(comm/guarded.py; combine, dispatch with a handle).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm import kernels, memory
from comm.events import EventOverlap
from comm.guarded import CallSignature, Exchange, Guard, launch_guarded
from comm.primitives import CollectiveInputError, exchange_counts

__all__ = ["Packed", "move", "pack", "send_back", "start_count_exchange"]


def start_count_exchange(
    num_tokens_per_rank: torch.Tensor | None, group: dist.ProcessGroup | None, device: torch.device,
    error: BaseException | None, signature: CallSignature,
) -> Callable[[], torch.Tensor]:
    """Launches the all-to-all of the rows each rank sends each peer, with this rank's ``error``
    flag and the call's ``signature`` (``num_tokens_per_rank`` is unused with an error: a rank
    with bad input has no counts, yet must take part so that its peers raise instead of
    blocking).

    Returns a function that waits and returns the rows received from each rank ([R] int64 on
    ``device``), or raises on every rank if any rank passed an error or the ranks' signatures
    differ. Local work placed between the two calls overlaps the round trip."""
    send = torch.zeros((dist.get_world_size(group), 1 + len(signature.fields)), dtype=torch.int64)
    if error is None:
        send[:, 0] = num_tokens_per_rank.cpu()
        send[:, 1:] = torch.tensor(signature.values(), dtype=torch.int64)
    arrived = exchange_counts(send.to(device), group, error, signature.what, async_op=True)

    def counts() -> torch.Tensor:
        recv = arrived()
        signature.check(recv[:, 1:].tolist())
        return recv[:, 0]

    return counts


@dataclass
class Packed:
    """A dispatch's packed send side.

    Attributes:
        send_pos: [T, R] int64, the send row of each (token, rank), -1 where not sent.
        send_side: uint8 [S, side bytes]: the side parts and the local top-k, or None when there
            is neither.
        k: the top-k width, None when no top-k travels.
        send_main: uint8 [S, main row bytes], a pooled scratch buffer.
        release: returns send_main to the pool; call it once no exchange reads it any more.
    """

    send_pos: torch.Tensor
    send_side: torch.Tensor | None
    k: int | None
    send_main: torch.Tensor
    release: Callable[[], None]


def pack(parts: list[torch.Tensor], in_rank: torch.Tensor, send_splits: tuple[int, ...],
         topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None, experts_per_rank: int,
         expert_base: int = 0) -> Packed:
    """The send side of ``move``: local work only (it needs no count from a peer), so the
    dispatch runs it while its count exchange is in flight. Arguments as in ``move``."""
    device = parts[0].device
    s = sum(send_splits)
    send_pos = kernels.send_positions(in_rank)
    side, k = parts[1:], (topk_idx.shape[1] if topk_idx is not None else None)
    side_width = kernels.row_bytes(side, k or 0)
    send_side = None
    if side_width:
        send_side = torch.empty((s, side_width), dtype=torch.uint8, device=device)
        kernels.pack_into(send_side, side, send_pos, topk_idx, topk_weights, experts_per_rank, expert_base)
    main = parts[0]
    width = main.shape[1] * main.element_size()
    send_bytes, release = memory.scratch(s * width, device)
    send_main = send_bytes.view(s, width)
    kernels.pack_into(send_main, [main], send_pos)
    return Packed(send_pos, send_side, k, send_main, release)


MOVE_EXCHANGES = 2
"""How many exchanges a ``move`` launches (the top-k side message and the main rows; the side one
may be None): a rank with bad input must join exactly as many as its peers launch."""


def move(parts: list[torch.Tensor], in_rank: torch.Tensor, send_splits: tuple[int, ...],
         recv_splits: tuple[int, ...], topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
         experts_per_rank: int, async_finish: bool, group: dist.ProcessGroup | None, *, expert_base: int = 0,
         wait_side: bool = False, packed: Packed | None = None, guarded: Guard = Guard.OFF,
         count_device: torch.device | None = None) -> tuple[list[torch.Tensor], EventOverlap, torch.Tensor]:
    """Sends row t of every part to each rank r with in_rank[t, r]; what arrives is ordered by
    source rank, then source row.

    Args:
        parts: [T, *] contiguous tensors; parts[0] is the main payload, the rest travel in the
            side message.
        in_rank: [T, R] bool, R the size of ``group``.
        send_splits, recv_splits: rows sent to / received from each rank.
        topk_idx, topk_weights: [T, k] global expert indices and float32 weights to send along,
            made local to the receiver (``expert_base`` is the receiving group's first expert;
            -1 and weight 0.0 where the expert lives elsewhere), or None.
        experts_per_rank: experts each rank of ``group`` holds.
        async_finish: return before the data arrives (it is there after the event's wait).
        wait_side: the side message has arrived when this returns (the caller needs the received
            top-k now); the main payload completes at the event.
        packed: the send side, already packed by ``pack`` with the same arguments.
        guarded: how the exchanges carry the error agreement (comm/guarded.py ``Guard``), its
            header on ``count_device`` (default: the payload's device); a peer's bad input raises
            at the event (not with ``wait_side``), or at once in the strict mode.

    Returns:
        (received parts [+ recv_topk_idx [N, k] int64, recv_topk_weights [N, k] float32], event,
        send_pos [T, R])."""
    if packed is None:
        packed = pack(parts, in_rank, send_splits, topk_idx, topk_weights, experts_per_rank, expert_base)
    device = parts[0].device
    n = sum(recv_splits)

    side, k = parts[1:], packed.k
    side_outs = [torch.empty((n, p.shape[1]), dtype=p.dtype, device=device) for p in side]
    if k is not None:
        side_outs += [torch.empty((n, k), dtype=torch.int64, device=device),
                      torch.empty((n, k), dtype=torch.float32, device=device)]
    side_ex = None
    if packed.send_side is not None:
        recv_side = torch.empty((n, packed.send_side.shape[1]), dtype=torch.uint8, device=device)
        side_ex = Exchange(recv_side, packed.send_side, recv_splits, send_splits)
    main = parts[0]
    recv_main = memory.output((n, main.shape[1]), main.dtype, device)
    main_ex = Exchange(kernels.as_bytes(recv_main), packed.send_main, recv_splits, send_splits, dtype=main.dtype)
    exchanges = [side_ex, main_ex]  # MOVE_EXCHANGES of them
    try:
        works, (side_work, main_work), check = _launch(exchanges, group, "dispatch", guarded, count_device or device)
    except CollectiveInputError:  # the strict check refused the call: nothing was launched
        packed.release()
        raise
    works.append(main_work)

    def unpack_side() -> None:
        kernels.unpack_into(recv_side, side_outs)

    steps: list[Callable[[], None]] = []
    if side_work is not None and wait_side:
        try:
            side_work.wait()
        except BaseException:
            # The main exchange may still read the send buffer: it goes back to the pool only
            # once that has ended too (its own failure, if any, is secondary to this one).
            with contextlib.suppress(Exception):
                EventOverlap(works, (), [packed.release]).current_stream_wait()
            raise
        unpack_side()
    elif side_work is not None:
        works.append(side_work)
        steps.append(unpack_side)
    # packed.release: the main exchange has finished reading the send buffer by then.
    event = _complete(works, check, steps, [packed.release], async_finish)
    return [recv_main, *side_outs], event, packed.send_pos


def send_back(tensors: Sequence[torch.Tensor | None], send_pos: torch.Tensor, send_splits: tuple[int, ...],
              recv_splits: tuple[int, ...], num_tokens: int, group: dist.ProcessGroup | None, async_finish: bool,
              *, guarded: Guard = Guard.OFF,
              count_device: torch.device | None = None) -> tuple[torch.Tensor | EventOverlap | None, ...]:
    """The reverse of a ``move``: each tensor in ``tensors`` ([N, *], one row per row the forward
    ``move`` delivered, in its order; None stays None) goes back, all launched together, and the
    rows that come back are summed per token (FP32; FP64 for float64).

    The rows are sent straight from the tensors (already in the exchange's order); they come back
    into pooled buffers. ``send_pos`` and the splits are the forward ``move``'s, as seen from the
    forward sender (so ``send_splits`` here are the rows it sent, now received back).
    ``guarded``: how the exchanges carry the error agreement (comm/guarded.py ``Guard``), its
    header on ``count_device`` (default: the first tensor's device); a peer's bad input raises
    CollectiveInputError at the event, or at once in the strict mode.

    Returns:
        (*sums [num_tokens, *] in each tensor's dtype (or None), event)."""
    exchanges, reduces, releases, results = [], [], [], []
    s = sum(send_splits)
    for t in tensors:
        if t is None:
            exchanges.append(None)
            results.append(None)
            continue
        t = t.contiguous()
        back_bytes, release = memory.scratch(s * t.shape[1] * t.element_size(), t.device)
        back = back_bytes.view(t.dtype).view(s, t.shape[1])
        exchanges.append(Exchange(back, t, send_splits, recv_splits))
        out = memory.output((num_tokens, t.shape[1]), t.dtype, t.device)
        reduces.append(functools.partial(kernels.combine_reduce_into, back, send_pos, out))
        releases.append(release)
        results.append(out)
    device = next(t.device for t in tensors if t is not None)
    try:
        works, exchange_works, check = _launch(exchanges, group, "combine", guarded, count_device or device)
    except CollectiveInputError:  # the strict check refused the call: nothing was launched
        for release in releases:
            release()
        raise
    event = _complete([*works, *exchange_works], check, reduces, releases, async_finish)
    return (*results, event)


def _launch(exchanges: Sequence[Exchange | None], group: dist.ProcessGroup | None, what: str, guarded: Guard,
            count_device: torch.device,
            ) -> tuple[list[dist.Work], list[dist.Work | None], Callable[[], None] | None]:
    """Starts every exchange that is not None, in order, asynchronously; with ``guarded`` behind
    the error-agreement header (comm/guarded.py; strict: after it has been checked).

    Returns (the header's work, or none; each exchange's work, None where the exchange is None;
    the check to run once all have been waited on, or None)."""
    if not guarded:
        return [], [None if ex is None else ex.launch(group) for ex in exchanges], None
    header_work, works, check = launch_guarded(exchanges, group, what, count_device, strict=guarded == Guard.STRICT)
    return [] if header_work is None else [header_work], works, check


def _complete(works: list[dist.Work | None], check: Callable[[], None] | None, steps: list[Callable[[], None]],
              releases: list[Callable[[], None]], async_finish: bool) -> EventOverlap:
    """The event of launched exchanges. After its works: ``check`` (a peer's bad input raises),
    then ``steps`` (unpacking, reduction), and in every case, also when a wait or a step raised,
    ``releases``, which hand pooled buffers back once every exchange has finished (EventOverlap
    runs them exactly once). Without ``async_finish`` it waits now and returns an
    already-finished event."""
    finish = ([check] if check is not None else []) + steps
    event = EventOverlap(works, finish, releases)
    if not async_finish:
        event.current_stream_wait()
        event = EventOverlap()
    return event
