"""Host memory for the exchanges: reused scratch buffers and reused output tensors.

Why (measured on the 2-core CPU machine, 4 gloo ranks): the first touch of a freshly allocated
61 MB tensor costs ~6x the copy that fills it (~2x with huge pages), because glibc serves
allocations of that size with a fresh mmap, and every page then faults. A dispatch + combine of
4096 x 2048 bf16 tokens allocated four such buffers per call and spent most of its time in page
faults, not in transfer.

- ``scratch(nbytes, device)``: a uint8 buffer for data that lives only during one exchange (the
  packed send rows, the rows a combine receives before its reduction). CPU buffers come from a
  small module-level pool, so their pages are touched once per process; every Buffer shares it.
  A buffer is handed out to one caller at a time (an async call keeps it until its event is
  waited on; one never waited on is simply never reused).
- ``output(shape, dtype, device)``: a tensor the CALLER keeps (recv_x, combined_x). It is carved
  from a cached CPU storage that no tensor references any more, so its pages are already
  faulted in. The rule that makes this safe: a cached storage is handed out again only when the
  cache holds its ONLY reference. Every tensor that shares the memory (the returned tensor, its
  views, ``detach()``, ``set_()`` onto it, a numpy array or DLPack capsule made from it,
  autograd's saved tensors, a pending async exchange writing into it) adds to the storage's use
  count, and a kept ``untyped_storage()`` object to its Python reference count; both are checked,
  so memory still reachable from Python is never reused. (As with any caching
  allocator, a raw ``data_ptr()`` kept past the tensor's life is not protected.) At most
  ``MAX_CACHED_OUTPUT_BYTES`` are cached; beyond that outputs are plain allocations. A returned
  tensor's storage may be up to 2x larger than the tensor (sizes vary with the routing, so a
  storage serves slightly larger later requests). ``empty_cache()`` drops the unreferenced ones.
- ``empty(shape, dtype, device)``: ``torch.empty`` with transparent huge pages advised (Linux),
  so the first touch faults ~512x fewer times; used for every new cached buffer.

CUDA tensors bypass all of this: torch's caching allocator already reuses device memory, and a
device buffer must not be recycled at a host-side wait while a stream may still read it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import threading
from collections.abc import Callable, Sequence

import torch

__all__ = ["MAX_CACHED_OUTPUT_BYTES", "empty", "empty_cache", "output", "scratch"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_MIN_POOLED = 1 << 20  # smaller buffers come from malloc's free lists anyway
_MAX_SLOTS = 4
MAX_CACHED_OUTPUT_BYTES = 1 << 30


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Hint the kernel to back the 2 MiB-aligned interior of t's memory with huge pages (a hint:
    failure or an unsupported kernel leaves ordinary pages)."""
    nbytes = t.numel() * t.element_size()
    if _madvise is None or nbytes < 2 * _HUGE_PAGE:
        return
    addr = t.data_ptr()
    start = -(-addr // _HUGE_PAGE) * _HUGE_PAGE
    end = (addr + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)``, with huge pages advised for large CPU tensors (see the module doc)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if t.device.type == "cpu":
        _advise_huge_pages(t)
    return t


class _Slot:
    """One pooled buffer and whether a caller holds it."""

    def __init__(self) -> None:
        self.data = torch.empty(0, dtype=torch.uint8)
        self.busy = False


_pool: list[_Slot] = []


def _no_op() -> None:
    return None


def scratch(nbytes: int, device: torch.device) -> tuple[torch.Tensor, Callable[[], None]]:
    """A uint8 [nbytes] buffer (contents undefined) and the function that returns it to the pool.

    Call the function once the buffer's last reader or writer has finished (for an exchange: after
    its work handle has been waited on)."""
    device = torch.device(device)
    if device.type != "cpu" or nbytes < _MIN_POOLED:
        return torch.empty(nbytes, dtype=torch.uint8, device=device), _no_op
    free = [s for s in _pool if not s.busy]
    fitting = [s for s in free if s.data.numel() >= nbytes]
    if fitting:
        slot = min(fitting, key=lambda s: s.data.numel())
    elif free:  # grow the largest free buffer (its old memory is released)
        slot = max(free, key=lambda s: s.data.numel())
        slot.data = empty((nbytes + nbytes // 8,), torch.uint8, device)  # slack: sizes vary with routing
    elif len(_pool) < _MAX_SLOTS:
        slot = _Slot()
        slot.data = empty((nbytes + nbytes // 8,), torch.uint8, device)
        _pool.append(slot)
    else:  # every slot held (many async calls in flight): a one-off buffer
        return empty((nbytes,), torch.uint8, device), _no_op
    slot.busy = True

    def release() -> None:
        slot.busy = False

    return slot.data[:nbytes], release


# What references a cached buffer's memory: the c10 storage use count (every tensor sharing it
# holds one) and, for a caller that kept only ``t.untyped_storage()`` (one Python object per
# storage, which may hold no extra count), that object's Python reference count. Both are
# compared with a buffer only the cache holds, measured here by the same code. The use count is a
# private torch function (torch >= 2.0); without it outputs are plain allocations.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _references(base: torch.Tensor) -> tuple[int, int]:
    storage = base.untyped_storage()
    return _storage_use_count(storage._cdata), sys.getrefcount(storage)


_UNREFERENCED = _references(torch.empty(1, dtype=torch.uint8)) if _storage_use_count is not None else None
_cached: list[torch.Tensor] = []  # uint8 buffers; outputs are tensors set_() onto their storage
_cache_lock = threading.Lock()


def _unreferenced(base: torch.Tensor) -> bool:
    return _references(base) == _UNREFERENCED


def output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor for the caller to keep, in reused memory when possible
    (see the module doc for the rule that keeps this safe)."""
    device = torch.device(device)
    shape = tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < _MIN_POOLED or _storage_use_count is None:
        return empty(shape, dtype, device)
    with _cache_lock:
        free = [b for b in _cached if _unreferenced(b)]
        fitting = [b for b in free if nbytes <= b.numel() <= 2 * nbytes]
        if fitting:
            base = min(fitting, key=lambda b: b.numel())
        else:
            size = nbytes + nbytes // 8  # slack: sizes vary with routing
            total = sum(b.numel() for b in _cached)
            for b in sorted(free, key=lambda b: b.numel()):  # make room: drop unreferenced misfits
                if total + size <= MAX_CACHED_OUTPUT_BYTES:
                    break
                _cached.remove(b)
                total -= b.numel()
            if total + size > MAX_CACHED_OUTPUT_BYTES:  # the cache is full of held buffers
                return empty(shape, dtype, device)
            base = empty((size,), torch.uint8, device)
            _cached.append(base)
        # Made while holding the lock: from here on the tensor's reference marks the buffer busy.
        return torch.empty(0, dtype=dtype, device=device).set_(base.untyped_storage(), 0, shape)


def empty_cache() -> None:
    """Forgets the cached output buffers no tensor references (their memory is freed)."""
    with _cache_lock:
        _cached[:] = [b for b in _cached if not _unreferenced(b)]
