"""Point-to-point transfers between pipeline ranks: tagged, non-blocking, self-describing.

Every transfer (one stage's activations to the next stage, or one stage's input gradients back to
the previous one) carries a *header*: the dtype, shape and requires_grad flag of every tensor (so
no "set the shapes first" step is needed), or an *abort* status with the sender's error text (a
rank that fails sends aborts for every transfer it still owes, so its peers raise too instead of
waiting forever). Tags derive from (kind, stage, chunk, step), so the order in which ranks post
operations does not matter, and a receiver posts all its receives when a step starts.

The first time a transfer is seen (per key and chunk count), the header goes alone and the
payloads follow once the receiver has read it. Both sides then remember its shapes, and from the
next step on the transfer is ONE message (header + payloads) into a buffer the receiver posted at
the start of the step; if the shapes changed, that message says RESHAPE and the payloads follow
separately. A helper thread posts payload receives as soon as headers land (gloo moves data only
into posted receives).

Payloads travel as raw bytes (``uint8`` views), which every backend moves, whatever the dtype
(bool, fp8, ...). Matching relies on tags, which gloo (and MPI) honour. NCCL ignores tags and
matches by order per pair of ranks, so on NCCL this protocol would need receives posted in each
sender's order: not implemented yet (``Pipeline`` refuses an NCCL group with a clear error rather
than risk a mismatch).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

ACT, GRAD = 0, 1  # transfer kinds: activation for F(stage, chunk), gradient for B(stage, chunk)
HEADER_LEN = 128
STATUS_OK, STATUS_ABORT, STATUS_RESHAPE = 1, 2, 3
HEADER_BYTES = HEADER_LEN * 8
ALIGN = 16  # payload offsets inside a combined message (so every dtype view is aligned)
MAX_TENSORS = 15  # sub-tags 1..15 after the header's 0
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


class _Recv:
    """One expected transfer: its header receive, then its payload receives."""

    def __init__(self, src: int, header: torch.Tensor, work: dist.Work):
        self.src, self.header, self.work = src, header, work
        self.metas: list[TensorMeta | None] | None = None
        self.buffers: list[torch.Tensor | None] = []
        self.payload_works: list[dist.Work] = []
        self.error: BaseException | None = None
        self.ready = threading.Event()  # payload receives posted (or error recorded)
        self.combined: torch.Tensor | None = None  # the one-message buffer, when shapes were cached


class P2P:
    """Tagged transfers for one pipeline step on one rank.

    ``peers[p]`` is the global rank of pipeline rank ``p``. ``step_id`` is folded into the tags,
    so a message of one step can never match a receive of another.
    """

    def __init__(self, group: dist.ProcessGroup | None, peers: Sequence[int], device: torch.device,
                 num_stages: int, num_chunks: int, step_id: int, cache: dict | None = None):
        self.group, self.peers, self.device = group, list(peers), device
        # Shapes of each transfer in the previous step, identical on sender and receiver: when a
        # transfer repeats them, it is ONE message (header + payloads) into a buffer the receiver
        # posted up front; otherwise the header says RESHAPE and the payloads follow separately.
        self.cache: dict = cache if cache is not None else {}
        self.num_stages, self.num_chunks = num_stages, num_chunks
        span = 2 * num_stages * num_chunks * 16
        if span > 2**30:
            raise ValueError(f"too many stages x chunks for P2P tags ({num_stages} x {num_chunks})")
        self.tag_base = (step_id % max(1, (2**31 - 1) // span - 1)) * span
        self.recvs: dict[tuple[int, int, int], _Recv] = {}
        self._thread: threading.Thread | None = None
        self.wait_s = 0.0  # seconds spent waiting in recv (the executor subtracts it from timelines)
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []

    def _tag(self, key: tuple[int, int, int], sub: int) -> int:
        kind, stage, chunk = key
        return self.tag_base + ((kind * self.num_stages + stage) * self.num_chunks + chunk) * 16 + sub

    def _ckey(self, key: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return (self.num_chunks, *key)

    def expect(self, key: tuple[int, int, int], src: int) -> None:
        """Posts the first receive of a transfer this rank will need (call early): the whole
        message if its shapes are cached, else its header."""
        cached = self.cache.get(self._ckey(key))
        if cached is not None:
            buf = torch.empty(combined_size(cached), dtype=torch.uint8, device=self.device)
            work = dist.irecv(buf, self.peers[src], group=self.group, tag=self._tag(key, 0))
            r = _Recv(src, buf[:HEADER_BYTES].view(torch.int64), work)
            r.combined = buf
        else:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            r = _Recv(src, header, dist.irecv(header, self.peers[src], group=self.group, tag=self._tag(key, 0)))
        self.recvs[key] = r

    def send(self, key: tuple[int, int, int], dst: int, tensors: Sequence[torch.Tensor | None]) -> None:
        """Non-blocking. Keeps the buffers until sent."""
        metas = metas_of(tensors)
        cached = self.cache.get(self._ckey(key))
        self.cache[self._ckey(key)] = metas
        payloads = [None if t is None else t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        if cached is not None and cached == metas:  # the receiver posted exactly this message
            buf = torch.empty(combined_size(metas), dtype=torch.uint8, device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_header(tensors))
            off = HEADER_BYTES
            for p in payloads:
                if p is not None:
                    buf[off : off + p.numel()].copy_(p)
                    off += _pad(p.numel())
            self._isend(buf, dst, self._tag(key, 0))
            return
        if cached is not None:  # the receiver posted the old size: fill it with a RESHAPE header
            buf = torch.zeros(combined_size(cached), dtype=torch.uint8, device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_header(tensors, STATUS_RESHAPE))
            self._isend(buf, dst, self._tag(key, 0))
        else:
            self._isend(encode_header(tensors).to(self.device), dst, self._tag(key, 0))
        for i, p in enumerate(payloads):
            if p is not None:
                self._isend(p, dst, self._tag(key, 1 + i))

    def send_abort(self, key: tuple[int, int, int], dst: int, message: str) -> None:
        cached = self.cache.get(self._ckey(key))
        if cached is not None:
            buf = torch.zeros(combined_size(cached), dtype=torch.uint8, device=self.device)
            buf[:HEADER_BYTES].view(torch.int64).copy_(encode_abort(message))
            self._isend(buf, dst, self._tag(key, 0))
        else:
            self._isend(encode_abort(message).to(self.device), dst, self._tag(key, 0))

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.sends.append((dist.isend(t, self.peers[dst], group=self.group, tag=tag), t))

    def _post_payload(self, key: tuple[int, int, int], r: _Recv) -> None:
        try:
            r.metas = decode_header(r.header, r.src)
        except BaseException as e:  # abort or bad header: raised by recv()
            r.metas, r.error = [], e
            return
        if r.combined is not None and int(r.header[0]) == STATUS_OK:  # payloads came in the same message
            off = HEADER_BYTES
            for m in r.metas:
                r.buffers.append(None if m is None else r.combined[off : off + m.nbytes])
                off += 0 if m is None else _pad(m.nbytes)
            return
        for i, m in enumerate(r.metas):
            if m is None:
                r.buffers.append(None)
                continue
            buf = torch.empty(m.nbytes, dtype=torch.uint8, device=self.device)
            r.buffers.append(buf)
            r.payload_works.append(dist.irecv(buf, self.peers[r.src], group=self.group, tag=self._tag(key, 1 + i)))

    def start_prefetch(self, order: Sequence[tuple[int, int, int]]) -> None:
        """Starts a helper thread that waits for each expected header (in ``order``, the order
        the executor will need them) and posts its payload receives at once.

        Why a thread: gloo (like most transports) moves a payload only once its receive is
        posted, so posting it when the header lands, rather than at the next action boundary,
        saves a round trip plus up to a whole action's time per transfer.
        """
        recvs = [(k, self.recvs[k]) for k in order]

        def run() -> None:
            for key, r in recvs:
                try:
                    r.work.wait()
                    self._post_payload(key, r)
                except BaseException as e:  # the group is broken: fail this and every later one
                    for _, rest in recvs[recvs.index((key, r)) :]:
                        rest.metas, rest.error = rest.metas or [], rest.error or e
                        rest.ready.set()
                    return
                r.ready.set()

        self._thread = threading.Thread(target=run, name="dualpipe-p2p-prefetch", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Drops finished sends (payload receives are posted by the prefetch thread)."""
        if len(self.sends) > 64:
            self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]

    def recv(self, key: tuple[int, int, int]) -> list[torch.Tensor | None]:
        """Waits for a transfer; returns its tensors (requires_grad as the sender's)."""
        r = self.recvs.pop(key)
        t0 = time.perf_counter()
        if self._thread is not None:
            r.ready.wait()
        elif r.metas is None:
            r.work.wait()
            self._post_payload(key, r)
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
        if self._thread is not None:
            self._thread.join()
