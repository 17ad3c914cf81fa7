"""Point-to-point transfers between pipeline ranks: ordered, grouped, self-describing.

Every transfer (one stage's activations to the next stage, or one stage's input gradients back to
the previous one) carries a *header*: the dtype, shape and requires_grad flag of every tensor (so
no "set the shapes first" step is needed), or an *abort* status with the sender's error text (a
rank that fails sends aborts for every transfer it still owes, so its peers raise too instead of
waiting forever).

**Matching by order, not by tag.** NCCL ignores P2P tags: it pairs the sends and receives of two
ranks in the order they are posted, and each receive buffer must have the sent size exactly.
Schedules are deterministic, so every rank can list the transfers each peer will send it, in the
peer's send order (``executor.transfer_plan``), and receives strictly in that order. Every message
uses tag 0, so gloo matches exactly like NCCL and the tests exercise the NCCL matching rule. (So,
during a step, nothing else may exchange tag-0 P2P messages between two ranks of the group.)

**Messages of a transfer.** The *first message* is the header alone the first time a transfer is
seen (per key and chunk count), then a *payload message* (every tensor packed at ALIGN offsets)
follows. Both sides then remember the shapes, and from the next step on the first message is
header + payloads in ONE message of a size both know; if the shapes changed, it says RESHAPE and a
payload message follows. Where a payload message goes, and so when the receiver must have read
the header that announces it, is fixed by the plan (below).

**Rounds of groups (NCCL).** An NCCL receive or send blocks its stream until matched, and batched
P2P runs on ONE stream per rank (the communicator of the whole group), so a receive posted alone
ahead of a send its peer waits for deadlocks, and so do two ranks whose lone sends wait for each
other's receives. So nothing is posted alone and nothing from a thread: every transfer is assigned
a *round* (``executor.transfer_rounds``: the time its data is produced in a unit-cost run of the
schedule, the same clock on every rank), and in each round every rank posts ONE group
(``torch.distributed.batch_isend_irecv``: an NCCL group on NCCL; on gloo, which does not group,
separate non-blocking ops posted straight on the process group)
holding exactly that round's first messages, sends and receives. A payload message goes in a
*payload group* at the transfer's *payload slot*: the clock time of the last round its receiver
posts before the action that consumes it (sender and receiver compute it alike). Every rank posts
its groups in clock order (a round, then the payload group of the same time) and matching groups
hold each other's messages exactly, so time by time every group completes: no deadlock, whatever
the timing. A rank posts, before each action, the rounds up to the one holding its previous
action's sends (sent while this action computes) and this action's inputs (and so any receive
produced earlier in the unit-cost run: posted early). It reads a header when the transfer is
consumed (a payload group whose headers have all landed goes out at once, so senders' payloads
are not held back), and at the latest before it posts a round of a later clock time, which comes
after the consuming action: so a rank never waits for a header before it needs the data, and with
cached shapes (no payload groups) posting a round never waits at all. (The previous rule, payloads
right after their own round, made a rank read every header of a round before posting the next one,
so its sends waited behind receives meant for later actions: the rounds ran in lock-step.) One
protocol on gloo too, which needs none of this, keeps the tests exercising the NCCL one.
``tests/dualpipe/test_nccl_model.py`` records the groups of real runs (every schedule, chunk
counts, first/cached/reshaped/inference steps) and checks them with a model of NCCL's semantics
(each rank runs its groups in order on one stream; a group completes when each op has its match, by
per-pair posting order and equal size, posted by the peer). A header on a CUDA tensor is read after
``wait()`` with a blocking copy to the host, ordered after the receive. This NCCL path follows
those semantics and passes that model, but has NOT yet run on a GPU.

Payloads travel as raw bytes (``uint8``), which every backend moves, whatever the dtype (bool,
fp8, ...); headers too, so both sides always agree on dtype and element count.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ACT, GRAD = 0, 1  # transfer kinds: activation for F(stage, chunk), gradient for B(stage, chunk)
Key = tuple[int, int, int]  # (kind, stage, chunk): one transfer of a step
TAG = 0  # every message: matching is by posting order (NCCL's rule), see the module docstring
HEADER_LEN = 128
STATUS_OK, STATUS_ABORT, STATUS_RESHAPE = 1, 2, 3
HEADER_BYTES = HEADER_LEN * 8
ALIGN = 16  # payload offsets inside a combined message (so every dtype view is aligned)
MAX_TENSORS = 15
_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}

_hints: dict[str, object] = {"shapes": None, "dtype": None}


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]] | None) -> None:
    """Optional hint, kept for DeepSeek DualPipe compatibility: the shapes of the tensors passed
    between stages. Shapes are learned from each transfer's header anyway; when hints are set, a
    received header that disagrees raises a clear error (a cheap consistency check)."""
    _hints["shapes"] = None if shapes is None else [tuple(int(d) for d in s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype | None) -> None:
    """Optional hint: the dtype of the tensors passed between stages (checked like the shapes)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"set_p2p_tensor_dtype: dtype must be a torch.dtype, got {type(dtype).__name__}")
    _hints["dtype"] = dtype


class PeerAbort(RuntimeError):
    """A peer rank failed during the step; the message carries its error."""


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def metas_of(tensors: Sequence[torch.Tensor | None]) -> list[TensorMeta | None]:
    return [None if t is None else TensorMeta(t.dtype, tuple(t.shape), t.requires_grad) for t in tensors]


def combined_size(metas: Sequence[TensorMeta | None]) -> int:
    """Bytes of a one-message transfer: the header, then each payload at an ALIGN offset."""
    return HEADER_BYTES + sum(_pad(m.nbytes) for m in metas if m is not None)


@functools.lru_cache(maxsize=1024)
def _header(metas: tuple[TensorMeta | None, ...], status: int) -> torch.Tensor:
    """The header of a transfer of tensors with these metas: [status, n, then per entry: dtype
    code (-1 for None), requires_grad, ndim, dims...] (int64 [HEADER_LEN]). Raises a clear error
    for what cannot travel (too many tensors or dimensions, a dtype with no code).

    Cached (a pipeline sends the same shapes every step, and a receiver compares a header with
    the one it expects instead of decoding it), so the tensor is shared by every call with these
    metas: it never leaves this module, whose code only copies from it or compares with it, so no
    caller can change what later headers say."""
    if len(metas) > MAX_TENSORS:
        raise ValueError(f"a stage passes at most {MAX_TENSORS} tensors to the next, got {len(metas)}")
    h = [status, len(metas)]
    for m in metas:
        if m is not None and m.dtype not in _DTYPE_CODE:
            raise TypeError(f"cannot send a tensor of dtype {m.dtype} between pipeline stages")
        h += [-1] if m is None else [_DTYPE_CODE[m.dtype], int(m.requires_grad), len(m.shape), *m.shape]
    if len(h) > HEADER_LEN:
        raise ValueError(f"too many dimensions in the tensors passed between stages (header of {len(h)} > {HEADER_LEN})")
    return torch.tensor(h + [0] * (HEADER_LEN - len(h)), dtype=torch.int64)


def encode_header(metas: Sequence[TensorMeta | None], status: int = STATUS_OK) -> torch.Tensor:
    """The header of ``metas`` (see ``_header``) as a new tensor the caller owns."""
    return _header(tuple(metas), status).clone()


def encode_abort(message: str) -> torch.Tensor:
    data = list(message.encode("utf-8", "replace")[: (HEADER_LEN - 2)])
    return torch.tensor([STATUS_ABORT, len(data), *data] + [0] * (HEADER_LEN - 2 - len(data)), dtype=torch.int64)


def decode_header(h: torch.Tensor, src: int) -> list[TensorMeta | None]:
    v = h.tolist()
    if v[0] == STATUS_ABORT:
        raise PeerAbort(f"pipeline rank {src} failed: " + bytes(v[2 : 2 + v[1]]).decode("utf-8", "replace"))
    if v[0] not in (STATUS_OK, STATUS_RESHAPE):
        raise RuntimeError(f"corrupt P2P header from pipeline rank {src} (status {v[0]})")
    out: list[TensorMeta | None] = []
    i = 2
    for _ in range(v[1]):
        if v[i] == -1:
            out.append(None)
            i += 1
            continue
        dtype, rg, nd = _DTYPES[v[i]], bool(v[i + 1]), v[i + 2]
        out.append(TensorMeta(dtype, tuple(v[i + 3 : i + 3 + nd]), rg))
        i += 3 + nd
    return out


def _check_hints(metas: list[TensorMeta | None], src: int) -> None:
    shapes, dtype = _hints["shapes"], _hints["dtype"]
    got = [m for m in metas if m is not None]
    if shapes is not None and [m.shape for m in got] != shapes:
        raise RuntimeError(f"P2P from pipeline rank {src}: shapes {[m.shape for m in got]} differ from the "
                           f"set_p2p_tensor_shapes hint {shapes}")
    if dtype is not None and any(m.dtype != dtype for m in got if m.dtype.is_floating_point):
        raise RuntimeError(f"P2P from pipeline rank {src}: dtypes {[m.dtype for m in got]} differ from the "
                           f"set_p2p_tensor_dtype hint {dtype}")


def _pack(buf: torch.Tensor, start: int, payloads: Sequence[torch.Tensor | None]) -> None:
    """Copies each payload's bytes into ``buf`` from ``start``, at ALIGN offsets."""
    off = start
    for p in payloads:
        if p is not None:
            buf[off : off + p.numel()].copy_(p)
            off += _pad(p.numel())


def _views(buf: torch.Tensor, start: int, metas: Sequence[TensorMeta | None]) -> list[torch.Tensor | None]:
    """The byte views of ``_pack``'s layout."""
    out: list[torch.Tensor | None] = []
    off = start
    for m in metas:
        out.append(None if m is None else buf[off : off + m.nbytes])
        off += 0 if m is None else _pad(m.nbytes)
    return out


class _Group:
    """One posted ``batch_isend_irecv``: its works (one per op on gloo, one for all on NCCL) and
    the buffers it must keep alive until done. Each work is waited at most once (a gloo work
    waited twice waits for a second message on its buffer)."""

    def __init__(self, works: list[dist.Work], num_ops: int, buffers: list[torch.Tensor]):
        self.works, self.num_ops, self.buffers = works, num_ops, buffers
        self.waited = [False] * len(works)

    def _wait_work(self, i: int) -> None:
        if not self.waited[i]:
            self.works[i].wait()
            self.waited[i] = True

    def wait(self, index: int | None = None) -> None:
        """Waits for op ``index`` (gloo: that op alone) or, with one work for the group, all."""
        if index is not None and len(self.works) == self.num_ops:
            self._wait_work(index)
            return
        for i in range(len(self.works)):
            self._wait_work(i)

    def done(self) -> bool:
        return all(self.waited)

    def ready(self, index: int) -> bool:
        """Whether op ``index`` (gloo: that op alone; NCCL: the whole group) is done, without waiting."""
        if len(self.works) == self.num_ops:
            return self.waited[index] or self.works[index].is_completed()
        return all(self.waited) or all(w.is_completed() for w in self.works)


@dataclass
class _Recv:
    """One expected transfer, filled in when its round is posted and its header read."""

    src: int
    cached: list[TensorMeta | None] | None = None  # shapes from the last step (the first message's size)
    first: torch.Tensor | None = None
    first_op: tuple[_Group, int] | None = None
    read: bool = False  # header read: metas (and views or owed) are known
    owed: bool = False  # a payload message follows, in the transfer's payload slot
    metas: list[TensorMeta | None] = field(default_factory=list)
    views: list[torch.Tensor | None] = field(default_factory=list)
    payload: torch.Tensor | None = None  # the separate payload message, when there is one
    payload_op: tuple[_Group, int] | None = None
    error: BaseException | None = None


Round = tuple[list[tuple[Key, int]], list[tuple[Key, int]]]  # (sends (key, dst), receives (key, src))


@dataclass(frozen=True)
class RoundPlan:
    """One rank's P2P plan for a step (``executor.transfer_rounds``): its ``rounds`` in the global
    order and their ``times`` on the unit-cost clock (the same clock on every rank), how many
    rounds to have posted before each action (``post_before``), and each transfer's payload
    ``slots`` (a clock time, the same on sender and receiver)."""

    rounds: list[Round]
    times: list[float]
    post_before: list[int]
    slots: dict[Key, float]


class P2P:
    """The transfers of one pipeline step on one rank, matched by order, posted in rounds.

    ``peers[p]`` is the global rank of pipeline rank ``p``. ``incoming[p]``: the transfers
    pipeline rank ``p`` sends to this rank, in the order ``p`` sends them; ``outgoing``: this
    rank's sends ``(key, destination)`` in the order it makes them (``send`` checks each against
    it, so a schedule that breaks the plan fails loudly instead of mismatching). ``plan``: this
    rank's rounds and payload slots (``executor.transfer_rounds``). The executor calls
    ``post(n)`` before each action (posts this rank's first n rounds), ``recv``/``send``, then
    ``finish``. ``log``, if given, gets every posted group as a list of ``(op, peer pipeline
    rank, bytes)``, op "send" or "recv" (for the NCCL model check).
    """

    def __init__(self, group: dist.ProcessGroup | None, peers: Sequence[int], device: torch.device,
                 num_chunks: int, incoming: dict[int, list[Key]], outgoing: list[tuple[Key, int]],
                 plan: RoundPlan, cache: dict | None = None, log: list | None = None):
        self.group, self.peers, self.device, self.num_chunks = group, list(peers), device, num_chunks
        # On gloo (no grouping: each op is its own work) ops go straight to the process group, by
        # group rank; other backends (NCCL) post each group with batch_isend_irecv.
        self.group_ranks = None
        if isinstance(group, dist.ProcessGroup) and dist.get_backend(group) == "gloo":
            self.group_ranks = [dist.get_group_rank(group, g) for g in self.peers]
        # Shapes of each transfer in the previous step, identical on sender and receiver: when a
        # transfer repeats them it is ONE message of a size both know (see the module docstring).
        self.cache: dict = cache if cache is not None else {}
        self.incoming = {p: list(keys) for p, keys in incoming.items() if keys}
        self.outgoing = list(outgoing)
        self.rounds, self.times = plan.rounds, plan.times
        self.num_sent = 0
        self.num_posted = 0
        self.recvs: dict[Key, _Recv] = {k: _Recv(p) for p, keys in self.incoming.items() for k in keys}
        self.round_of = {k: i for i, (_, rs) in enumerate(self.rounds) for k, _ in rs}
        self.slot_of = plan.slots  # this rank's sends and receives
        # Payload groups in clock order: (slot, sends in send order, receives in each sender's order).
        by_slot: dict[float, Round] = {}
        for key, dst in self.outgoing:
            by_slot.setdefault(self.slot_of[key], ([], []))[0].append((key, dst))
        for src in sorted(self.incoming):
            for key in self.incoming[src]:
                by_slot.setdefault(self.slot_of[key], ([], []))[1].append((key, src))
        self.payload_slots = [(t, *by_slot[t]) for t in sorted(by_slot)]
        self.num_payloads_posted = 0
        self.consumed: set[Key] = set()
        self.out: dict[Key, tuple[torch.Tensor, torch.Tensor | None]] = {}  # (first message, payload message)
        self.in_flight: list[_Group] = []
        self.wait_s = 0.0  # seconds spent waiting in recv (the executor subtracts it from timelines)
        self.log = log

    def _ckey(self, key: Key) -> tuple[int, int, int, int]:
        return (self.num_chunks, *key)

    # ------------------------------------------------------------------ rounds
    def _group(self, ops: list[tuple[str, int, torch.Tensor]]) -> _Group | None:
        if not ops:
            return None
        if self.group_ranks is not None:  # gloo: what batch_isend_irecv does there, minus its per-op checks
            pg, ranks = self.group, self.group_ranks
            works = [pg.send([buf], ranks[peer], TAG) if kind == "send" else pg.recv([buf], ranks[peer], TAG)
                     for kind, peer, buf in ops]
        else:
            works = list(dist.batch_isend_irecv([
                dist.P2POp(dist.isend if kind == "send" else dist.irecv, buf, self.peers[peer], self.group, TAG)
                for kind, peer, buf in ops]))
        g = _Group(works, len(ops), [buf for _, _, buf in ops])
        self.in_flight.append(g)
        if self.log is not None:
            self.log.append([(kind, peer, buf.numel()) for kind, peer, buf in ops])
        return g

    def _post_round(self, index: int) -> None:
        """One group with the round's first messages (sends in this rank's send order, receives
        in each sender's order), after every payload group of an earlier clock time."""
        self._post_payloads(self.times[index], before=True)
        sends, recvs = self.rounds[index]
        ops: list[tuple[str, int, torch.Tensor]] = []
        for key, dst in sends:
            if key not in self.out:
                raise RuntimeError(f"P2P transfer {key} to pipeline rank {dst} is due in round {index} but was "
                                   "not sent yet (the executor and transfer_rounds disagree)")
            ops.append(("send", dst, self.out[key][0]))
        for key, src in recvs:
            r = self.recvs[key]
            r.cached = self.cache.get(self._ckey(key))
            r.first = torch.empty(combined_size(r.cached) if r.cached is not None else HEADER_BYTES,
                                  dtype=torch.uint8, device=self.device)
            ops.append(("recv", src, r.first))
        g = self._group(ops)
        for i, (key, _) in enumerate(recvs):
            assert g is not None
            self.recvs[key].first_op = (g, len(sends) + i)

    def _post_payloads(self, upto: float, before: bool = False, block: bool = True) -> None:
        """Posts, in clock order, the payload groups of slots up to ``upto`` (strictly before it
        with ``before``), each after every round of its time or earlier. A group holds the slot's
        payload messages (a header decides whether one follows), so the slot's headers are read
        first; ``block=False`` stops at the first group whose headers have not all landed."""
        while self.num_payloads_posted < len(self.payload_slots):
            t, sends, recvs = self.payload_slots[self.num_payloads_posted]
            if t > upto or (before and t == upto):
                return
            if self.num_posted < len(self.rounds) and self.times[self.num_posted] <= t:
                return  # a round of this time or earlier is not posted yet (it goes first)
            if not block and not all(self._landed(key) for key, _ in recvs):
                return
            self.num_payloads_posted += 1
            ops: list[tuple[str, int, torch.Tensor]] = []
            for key, dst in sends:
                if key not in self.out:
                    raise RuntimeError(f"P2P transfer {key} to pipeline rank {dst} has its payload slot at {t} but "
                                       "was not sent yet (the executor and transfer_rounds disagree)")
                payload = self.out.pop(key)[1]
                if payload is not None:
                    ops.append(("send", dst, payload))
            owed = [key for key, _ in recvs if self._read(key)]
            for key in owed:
                r = self.recvs[key]
                r.payload = torch.empty(combined_size(r.metas) - HEADER_BYTES, dtype=torch.uint8, device=self.device)
                ops.append(("recv", r.src, r.payload))
            g = self._group(ops)
            for i, key in enumerate(owed):
                assert g is not None
                self.recvs[key].payload_op = (g, len(ops) - len(owed) + i)

    def post(self, num_rounds: int) -> None:
        """Posts this rank's rounds up to ``num_rounds`` (in order; each once), then the payload
        groups due by then whose headers have already landed (so senders' payloads go early)."""
        target = min(num_rounds, len(self.rounds))
        while self.num_posted < target:
            self._post_round(self.num_posted)
            self.num_posted += 1
        if self.num_posted:
            self._post_payloads(self.times[self.num_posted - 1], block=False)

    def _wait(self, op: tuple[_Group, int]) -> None:
        t0 = time.perf_counter()
        op[0].wait(op[1])
        self.wait_s += time.perf_counter() - t0

    def _landed(self, key: Key) -> bool:
        """Whether ``key``'s first message can be read without waiting."""
        r = self.recvs[key]
        return r.read or (r.first_op is not None and r.first_op[0].ready(r.first_op[1]))

    def _read(self, key: Key) -> bool:
        """Reads a first message's header (once; waits for it); True if a payload message follows."""
        r = self.recvs[key]
        if r.read:
            return r.owed
        assert r.first_op is not None and r.first is not None
        self._wait(r.first_op)
        r.read = True
        # After wait() (which on NCCL orders the current stream after the receive), a blocking
        # copy to the host: the header is read only once it has landed.
        header = r.first[:HEADER_BYTES].view(torch.int64)
        header = header.cpu() if header.device.type != "cpu" else header
        if r.cached is not None and torch.equal(header, _header(tuple(r.cached), STATUS_OK)):  # the steady state
            r.metas = list(r.cached)
            r.views = _views(r.first, HEADER_BYTES, r.metas)
            return False
        try:
            r.metas = decode_header(header, r.src)
        except (PeerAbort, RuntimeError) as e:  # an abort (or garbage): recv() raises it
            r.error = e
            return False
        if r.cached is not None and int(header[0]) == STATUS_OK:  # the payloads came in the same message
            r.views = _views(r.first, HEADER_BYTES, r.metas)
        elif combined_size(r.metas) > HEADER_BYTES:
            r.owed = True
        else:
            r.views = [None] * len(r.metas)  # nothing but Nones (or empty tensors)
        return r.owed

    def recv(self, key: Key) -> list[torch.Tensor | None]:
        """Waits for a transfer; returns its tensors (requires_grad as the sender's)."""
        if key in self.consumed:
            raise RuntimeError(f"P2P transfer {key} received twice")
        self.post(self.round_of[key] + 1)  # normally posted already (executor.transfer_rounds)
        self.consumed.add(key)
        r = self.recvs[key]
        if self._read(key):
            if r.payload_op is None:  # post the rounds and payload groups through its slot
                slot = self.slot_of[key]
                self.post(bisect.bisect_right(self.times, slot))
                self._post_payloads(slot)
            assert r.payload_op is not None and r.payload is not None
            self._wait(r.payload_op)
            r.views = _views(r.payload, 0, r.metas)
        if r.error is not None:
            raise r.error
        _check_hints(r.metas, r.src)
        self.cache[self._ckey(key)] = r.metas
        out: list[torch.Tensor | None] = []
        for m, buf in zip(r.metas, r.views, strict=True):
            if m is None:
                out.append(None)
            else:
                t = buf.view(m.dtype).reshape(m.shape)
                out.append(t.requires_grad_() if m.requires_grad else t)
        return out

    # ------------------------------------------------------------------ sending
    def _next_send(self, key: Key, dst: int) -> None:
        if self.num_sent >= len(self.outgoing) or self.outgoing[self.num_sent] != (key, dst):
            want = self.outgoing[self.num_sent] if self.num_sent < len(self.outgoing) else "nothing"
            raise RuntimeError(f"P2P send {key} to pipeline rank {dst} is out of the planned order "
                               f"(next planned: {want}); the receiver would mismatch it")
        self.num_sent += 1

    def send(self, key: Key, dst: int, tensors: Sequence[torch.Tensor | None]) -> None:
        """Packs the tensors into this transfer's messages (copies: the caller may free its
        tensors); they go out with the transfer's round (posted before a later action)."""
        metas = metas_of(tensors)
        ckey = self._ckey(key)
        cached = self.cache.get(ckey)
        steady = cached is not None and cached == metas  # the receiver expects exactly this one message
        # Made (and the tensors checked) before the send is counted: a refused send is still owed
        # to its receiver, as an abort (send_aborts).
        header = _header(tuple(metas), STATUS_OK if steady or cached is None else STATUS_RESHAPE)
        self._next_send(key, dst)
        self.cache[ckey] = metas
        payloads = [None if t is None else t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        if steady:
            buf = torch.empty(combined_size(metas), dtype=torch.uint8, device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(header)
            _pack(buf, HEADER_BYTES, payloads)
            self.out[key] = (buf, None)
            return
        # The first message has the size the receiver expects (the cached one, or a header), then
        # the payload message; the header tells the receiver its size.
        first = torch.zeros(combined_size(cached) if cached is not None else HEADER_BYTES, dtype=torch.uint8,
                            device=self.device)
        first[:HEADER_BYTES].view(torch.int64).copy_(header)
        payload = None
        if combined_size(metas) > HEADER_BYTES:
            payload = torch.empty(combined_size(metas) - HEADER_BYTES, dtype=torch.uint8, device=self.device)
            _pack(payload, 0, payloads)
        self.out[key] = (first, payload)

    def send_aborts(self, message: str) -> None:
        """After an error: an abort, in place of data, for every planned send not made yet."""
        for key, _ in self.outgoing[self.num_sent :]:
            cached = self.cache.get(self._ckey(key))
            buf = torch.zeros(combined_size(cached) if cached is not None else HEADER_BYTES, dtype=torch.uint8,
                              device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_abort(message))
            self.out[key] = (buf, None)
        self.num_sent = len(self.outgoing)

    # ------------------------------------------------------------------ step end
    def poll(self) -> None:
        """Drops groups whose works were all waited (their buffers); never changes what is posted
        next. (Sends are waited at ``finish``: a send's buffer is a packed copy.)"""
        if len(self.in_flight) > 16:
            self.in_flight = [g for g in self.in_flight if not g.done()]

    def drain(self) -> None:
        """After an error: consume every expected transfer (data or abort), then finish sends."""
        self.post(len(self.rounds))
        for key in self.recvs:
            if key not in self.consumed:
                with contextlib.suppress(PeerAbort, RuntimeError):
                    self.recv(key)
        self.finish()

    def finish(self) -> None:
        """Posts the rounds and payload groups still due (the last sends), then waits for every
        group."""
        self.post(len(self.rounds))
        self._post_payloads(float("inf"))
        for g in self.in_flight:
            g.wait()
        self.in_flight.clear()
