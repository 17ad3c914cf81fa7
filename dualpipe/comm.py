"""Point-to-point transfers between pipeline ranks: ordered, non-blocking, self-describing.

Every transfer (one stage's activations to the next stage, or one stage's input gradients back to
the previous one) carries a *header*: the dtype, shape and requires_grad flag of every tensor (so
no "set the shapes first" step is needed), or an *abort* status with the sender's error text (a
rank that fails sends aborts for every transfer it still owes, so its peers raise too instead of
waiting forever).

**Matching by order, not by tag.** NCCL ignores P2P tags: it pairs the sends and receives of two
ranks in the order they are posted, and each receive buffer must have the sent size exactly.
Schedules are deterministic, so every rank can list the transfers each peer will send it, in the
peer's send order (``executor.transfer_plan``). A receiver thread per peer walks that list
and posts strictly in it: the transfer's first receive, then (once it has landed and said so) its
payload receives, and only then the next transfer's first receive. Every message uses tag 0, so
gloo matches exactly like NCCL and the tests exercise the NCCL matching rule. (So, during a step,
nothing else may exchange tag-0 P2P messages between two ranks of the pipeline's group.)

The first time a transfer is seen (per key and chunk count), the header goes alone and the
payloads follow once the receiver has read it. Both sides then remember its shapes, and from the
next step on the transfer is ONE message (header + payloads) of a size both sides know; if the
shapes changed, that message says RESHAPE and the payloads follow separately.

Payloads travel as raw bytes (``uint8``), which every backend moves, whatever the dtype (bool,
fp8, ...); headers too, so both sides always agree on dtype and element count.

NCCL is not supported yet for another reason (``Pipeline`` refuses it): an NCCL receive blocks the
communicator's stream until it is matched, so the receives posted ahead here would hold back this
rank's own sends to that peer; running on NCCL needs both ranks of a pair to issue their sends
and receives in one common order (or grouped), which this module does not do. (Also, waiting on
an NCCL work only orders streams: the receiver threads would have to synchronise before reading a
header.)
"""

from __future__ import annotations

import contextlib
import threading
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
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def metas_of(tensors: Sequence[torch.Tensor | None]) -> list[TensorMeta | None]:
    return [None if t is None else TensorMeta(t.dtype, tuple(t.shape), t.requires_grad) for t in tensors]


def combined_size(metas: Sequence[TensorMeta | None]) -> int:
    """Bytes of a one-message transfer: the header, then each payload at an ALIGN offset."""
    return HEADER_BYTES + sum(_pad(m.nbytes) for m in metas if m is not None)


def encode_header(tensors: Sequence[torch.Tensor | None], status: int = STATUS_OK) -> torch.Tensor:
    """[status, n, then per entry: dtype code (-1 for None), requires_grad, ndim, dims...]."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a stage passes at most {MAX_TENSORS} tensors to the next, got {len(tensors)}")
    h = [status, len(tensors)]
    for t in tensors:
        if t is None:
            h.append(-1)
            continue
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"cannot send a tensor of dtype {t.dtype} between pipeline stages")
        h += [_DTYPE_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(h) > HEADER_LEN:
        raise ValueError(f"too many dimensions in the tensors passed between stages (header of {len(h)} > {HEADER_LEN})")
    return torch.tensor(h + [0] * (HEADER_LEN - len(h)), dtype=torch.int64)


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


@dataclass
class _Recv:
    """One expected transfer, filled in by its peer's receiver thread."""

    src: int
    metas: list[TensorMeta | None] = field(default_factory=list)
    buffers: list[torch.Tensor | None] = field(default_factory=list)
    payload_works: list[dist.Work] = field(default_factory=list)
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)  # header read, payloads posted


class P2P:
    """The transfers of one pipeline step on one rank, matched by order.

    ``peers[p]`` is the global rank of pipeline rank ``p``. ``incoming[p]``: the transfers
    pipeline rank ``p`` sends to this rank, in the order ``p`` sends them; ``outgoing``: this
    rank's sends ``(key, destination)`` in the order it makes them (``send`` checks each against
    it, so a schedule that breaks the plan fails loudly instead of mismatching).
    """

    def __init__(self, group: dist.ProcessGroup | None, peers: Sequence[int], device: torch.device,
                 num_chunks: int, incoming: dict[int, list[Key]], outgoing: list[tuple[Key, int]],
                 cache: dict | None = None):
        self.group, self.peers, self.device, self.num_chunks = group, list(peers), device, num_chunks
        # Shapes of each transfer in the previous step, identical on sender and receiver: when a
        # transfer repeats them it is ONE message of a size both know (see the module docstring).
        self.cache: dict = cache if cache is not None else {}
        self.incoming = {p: list(keys) for p, keys in incoming.items() if keys}
        self.outgoing = list(outgoing)
        self.num_sent = 0
        self.recvs: dict[Key, _Recv] = {k: _Recv(p) for p, keys in self.incoming.items() for k in keys}
        self._threads: list[threading.Thread] = []
        self.wait_s = 0.0  # seconds spent waiting in recv (the executor subtracts it from timelines)
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []

    def _ckey(self, key: Key) -> tuple[int, int, int, int]:
        return (self.num_chunks, *key)

    # ------------------------------------------------------------------ receiving
    def start(self) -> None:
        """Starts one receiver thread per sending peer.

        Why threads: a receive can only be posted once the previous transfer from that peer is
        understood (its payload sizes come in its header), and gloo (like most transports) moves
        a message only into a posted receive; a thread that posts the next receive as soon as
        the last lands keeps data flowing while the rank computes.
        """
        for src, keys in self.incoming.items():
            items = [(k, self.recvs[k]) for k in keys]  # recv() pops from self.recvs meanwhile
            t = threading.Thread(target=self._receive_from, args=(items,), name=f"dualpipe-recv-{src}", daemon=True)
            t.start()
            self._threads.append(t)

    def _irecv(self, buf: torch.Tensor, src: int) -> dist.Work:
        return dist.irecv(buf, self.peers[src], group=self.group, tag=TAG)

    def _receive_from(self, items: list[tuple[Key, _Recv]]) -> None:
        broken: BaseException | None = None
        for key, r in items:
            if broken is None:
                try:
                    self._receive_one(key, r)
                except BaseException as e:  # the group itself failed: fail this and every later one
                    broken = e
                if r.error is not None and not isinstance(r.error, PeerAbort):
                    broken = r.error  # a corrupt header: later messages cannot be trusted either
            if broken is not None:
                r.error = r.error or broken
            r.ready.set()

    def _receive_one(self, key: Key, r: _Recv) -> None:
        """Posts and waits for the transfer's first message, then posts its payload receives."""
        cached = self.cache.get(self._ckey(key))
        first = torch.empty(combined_size(cached) if cached is not None else HEADER_BYTES, dtype=torch.uint8,
                            device=self.device)
        self._irecv(first, r.src).wait()
        header = first[:HEADER_BYTES].view(torch.int64)
        try:
            r.metas = decode_header(header, r.src)
        except (PeerAbort, RuntimeError) as e:  # an abort (or garbage): recv() raises it
            r.error = e
            return
        if cached is not None and int(header[0]) == STATUS_OK:  # the payloads came in the same message
            off = HEADER_BYTES
            for m in r.metas:
                r.buffers.append(None if m is None else first[off : off + m.nbytes])
                off += 0 if m is None else _pad(m.nbytes)
            return
        for m in r.metas:  # posted now, before the next transfer's first receive: the sender's order
            buf = None if m is None else torch.empty(m.nbytes, dtype=torch.uint8, device=self.device)
            r.buffers.append(buf)
            if buf is not None:
                r.payload_works.append(self._irecv(buf, r.src))

    def recv(self, key: Key) -> list[torch.Tensor | None]:
        """Waits for a transfer; returns its tensors (requires_grad as the sender's)."""
        r = self.recvs.pop(key)
        t0 = time.perf_counter()
        r.ready.wait()
        for w in r.payload_works:
            w.wait()
        self.wait_s += time.perf_counter() - t0
        if r.error is not None:
            raise r.error
        _check_hints(r.metas, r.src)
        self.cache[self._ckey(key)] = r.metas
        out: list[torch.Tensor | None] = []
        for m, buf in zip(r.metas, r.buffers, strict=True):
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

    def _isend(self, t: torch.Tensor, dst: int) -> None:
        self.sends.append((dist.isend(t, self.peers[dst], group=self.group, tag=TAG), t))

    def send(self, key: Key, dst: int, tensors: Sequence[torch.Tensor | None]) -> None:
        """Non-blocking. Keeps the buffers until sent."""
        self._next_send(key, dst)
        metas = metas_of(tensors)
        cached = self.cache.get(self._ckey(key))
        self.cache[self._ckey(key)] = metas
        payloads = [None if t is None else t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        if cached is not None and cached == metas:  # the receiver expects exactly this one message
            buf = torch.empty(combined_size(metas), dtype=torch.uint8, device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_header(tensors))
            off = HEADER_BYTES
            for p in payloads:
                if p is not None:
                    buf[off : off + p.numel()].copy_(p)
                    off += _pad(p.numel())
            self._isend(buf, dst)
            return
        if cached is not None:  # the receiver expects the old size: fill it with a RESHAPE header
            buf = torch.zeros(combined_size(cached), dtype=torch.uint8, device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_header(tensors, STATUS_RESHAPE))
            self._isend(buf, dst)
        else:
            self._isend(encode_header(tensors).view(torch.uint8).to(self.device), dst)
        for p in payloads:
            if p is not None:
                self._isend(p, dst)

    def send_aborts(self, message: str) -> None:
        """After an error: an abort, in place of data, for every planned send not made yet."""
        for key, dst in self.outgoing[self.num_sent :]:
            cached = self.cache.get(self._ckey(key))
            buf = torch.zeros(combined_size(cached) if cached is not None else HEADER_BYTES, dtype=torch.uint8,
                              device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_abort(message))
            self._isend(buf, dst)
        self.num_sent = len(self.outgoing)

    # ------------------------------------------------------------------ step end
    def poll(self) -> None:
        """Drops finished sends (payload receives are posted by the receiver threads)."""
        if len(self.sends) > 64:
            self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]

    def drain(self) -> None:
        """After an error: consume every expected transfer (data or abort), then finish sends."""
        for key in list(self.recvs):
            with contextlib.suppress(PeerAbort, RuntimeError):
                self.recv(key)
        self.finish()

    def finish(self) -> None:
        for w, _ in self.sends:
            w.wait()
        self.sends.clear()
        for t in self._threads:
            t.join()
