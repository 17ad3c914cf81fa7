"""Communication primitives over any torch.distributed backend (gloo, NCCL, MPI).

- ``all_to_all_v``: the plain variable-size all-to-all, autograd-aware (its backward is the
  same exchange with the split sizes swapped).
- ``exchange_counts`` / ``agree_no_error``: the small collectives the dispatch uses to learn how
  many rows it will receive, and to make a bad input on ONE rank raise on EVERY rank instead of
  leaving the others blocked in a collective until the backend's timeout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["CollectiveInputError", "agree_no_error", "all_to_all_v", "exchange_counts", "launch_all_to_all", "raise_if_flagged"]


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))


class CollectiveInputError(RuntimeError):
    """Another rank of the group rejected its input, so this rank stops too."""


def raise_if_flagged(flags: list[int], own: BaseException | None, what: str) -> None:
    """Raises ``own`` (this rank's input error) if given, else CollectiveInputError naming the
    ranks whose flag in ``flags`` (one per rank) is set."""
    if own is not None:
        raise own
    bad = [r for r, f in enumerate(flags) if f]
    if bad:
        raise CollectiveInputError(f"{what} aborted on every rank: rank(s) {bad} of the group rejected their input "
                                   "(their exceptions say why)")


def exchange_counts(
    send: torch.Tensor, group: dist.ProcessGroup | None, error: BaseException | None, what: str,
    async_op: bool = False,
):
    """All-to-all of one int64 row per destination rank ([R, c] -> [R, c] by source rank), with an
    error flag appended to every row: if any rank passed ``error``, every rank raises.

    With ``async_op`` the exchange is only launched, and a function is returned that waits for it
    and then returns the counts (or raises): local work placed in between overlaps the round trip."""
    num_ranks = dist.get_world_size(group)
    flagged = torch.zeros((num_ranks, send.shape[1] + 1), dtype=torch.int64, device=send.device)
    if error is None:
        flagged[:, :-1] = send
    else:
        flagged[:, -1] = 1
    recv = torch.empty_like(flagged)
    work = dist.all_to_all_single(recv, flagged, group=group, async_op=async_op)

    def arrived() -> torch.Tensor:
        if work is not None:
            work.wait()
        raise_if_flagged(recv[:, -1].tolist(), error, what)
        return recv[:, :-1]

    return arrived if async_op else arrived()


def agree_no_error(group: dist.ProcessGroup | None, error: BaseException | None, device: torch.device, what: str) -> None:
    """One tiny all-gather of error flags; raises on every rank if any rank passed ``error``."""
    num_ranks = dist.get_world_size(group)
    flag = torch.full((num_ranks,), 0 if error is None else 1, dtype=torch.int64, device=device)
    flags = torch.empty_like(flag)
    dist.all_to_all_single(flags, flag, group=group)
    raise_if_flagged(flags.tolist(), error, what)


def launch_all_to_all(
    out: torch.Tensor,
    inp: torch.Tensor,
    output_split_sizes: Sequence[int],
    input_split_sizes: Sequence[int],
    group: dist.ProcessGroup | None,
    async_op: bool,
) -> dist.Work | None:
    """``all_to_all_single`` along dim 0; returns the work handle when ``async_op``. Float8
    tensors travel as uint8 views (gloo rejects float8 dtypes; the bytes are the same)."""
    if out.dtype in _FLOAT8:
        out, inp = out.view(torch.uint8), inp.view(torch.uint8)
    return dist.all_to_all_single(out, inp, list(output_split_sizes), list(input_split_sizes), group=group,
                                  async_op=async_op)


def _check_splits(name: str, splits: Sequence[int], num_ranks: int) -> list[int]:
    splits = [int(s) for s in splits]
    if len(splits) != num_ranks or any(s < 0 for s in splits):
        raise ValueError(f"{name} must hold {num_ranks} non-negative ints (one per rank), got {splits}")
    return splits


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        launch_all_to_all(out, x.contiguous(), out_splits, in_splits, group, async_op=False)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        launch_all_to_all(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, async_op=False)
        return back, None, None, None


def all_to_all_v(
    x: torch.Tensor,
    output_split_sizes: Sequence[int],
    input_split_sizes: Sequence[int],
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
):
    """Variable-size all-to-all along dim 0, differentiable.

    Args:
        x: [sum(input_split_sizes), ...] any dtype the backend carries; rows
            input_split_sizes[:r] .. go to rank r.
        output_split_sizes: rows received from each rank (must equal what each peer sends).
        input_split_sizes: rows sent to each rank.
        group: process group (default: the world).
        async_op: return ``(out, EventOverlap)`` immediately; ``out`` holds the data after
            ``event.current_stream_wait()``. Not differentiable (use the synchronous form inside
            autograd).

    Returns:
        out [sum(output_split_sizes), ...] in x's dtype, ordered by source rank; with async_op,
        ``(out, event)``.
    """
    from comm.events import EventOverlap

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    num_ranks = dist.get_world_size(group)
    out_splits = _check_splits("output_split_sizes", output_split_sizes, num_ranks)
    in_splits = _check_splits("input_split_sizes", input_split_sizes, num_ranks)
    if x.dim() == 0 or sum(in_splits) != x.shape[0]:
        raise ValueError(f"x must have sum(input_split_sizes) = {sum(in_splits)} rows, got shape {tuple(x.shape)}")
    if not async_op:
        return _AllToAllV.apply(x, out_splits, in_splits, group)
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = launch_all_to_all(out, x.detach().contiguous(), out_splits, in_splits, group, async_op=True)
    return out, EventOverlap([work])
