"""Host memory for the exchanges: reused scratch buffers and huge-page receive tensors.

Why (measured on the 2-core CPU machine, 4 gloo ranks): the first touch of a freshly allocated
61 MB tensor costs ~6x the copy that fills it, because glibc serves allocations of that size with
a fresh mmap, and every 4 KiB page then faults. A dispatch + combine of 4096 x 2048 bf16 tokens
allocated four such buffers per call and spent most of its time in page faults, not in transfer.

- ``scratch(nbytes, device)``: a uint8 buffer for data that lives only during one exchange (the
  packed send rows, the rows a combine receives before its reduction). CPU buffers come from a
  small module-level pool, so their pages are touched once per process; every Buffer shares it.
  A buffer is handed out to one caller at a time (an async call keeps it until its event is
  waited on; one never waited on is simply never reused).
- ``empty(shape, dtype, device)``: a tensor the caller keeps (recv_x, combined_x). On Linux CPUs
  its pages are advised as transparent huge pages before first touch (``madvise``), so filling
  it faults ~512x fewer times; elsewhere it is a plain ``torch.empty``.

CUDA tensors bypass both: torch's caching allocator already reuses device memory, and a device
buffer must not be recycled at a host-side wait while a stream may still read it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable, Sequence

import torch

__all__ = ["empty", "scratch"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_MIN_POOLED = 1 << 20  # smaller buffers come from malloc's free lists anyway
_MAX_SLOTS = 4


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
