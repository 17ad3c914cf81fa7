"""Python face of the native comm kernels (csrc/comm/): byte views, calls and fake impls.

Payloads travel as uint8 rows: any dtype (bf16, fp32, float8 and its float32 scales) is viewed
as bytes, so dispatch moves exactly the bytes it was given, and backends that reject float8
(gloo) carry it. Callers in this package validate arguments first; these wrappers only shape.
"""

from __future__ import annotations

import torch

from ops._native import native

__all__ = ["FLOAT_DTYPES", "as_bytes", "combine_reduce_into", "dispatch_layout", "pack", "pack_into", "permute",
           "row_bytes", "send_positions", "unpack_into", "unpermute"]

# Float dtypes of the rows dispatch/combine/permute accept (the kernels that sum rows dispatch over
# exactly these: csrc/comm/comm_checks.h). Sums run in FP32, or in FP64 for float64 rows. This is
# comm's own list: ops.checks.FLOAT_INPUT_DTYPES (the FP8 cast and GEMM inputs) has no float64.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous [N, C] tensor viewed as uint8 [N, C * itemsize] (no copy)."""
    if t.dtype == torch.uint8 and t.is_contiguous():
        return t
    if not t.is_contiguous() or (t.dim() and t.stride(-1) != 1):  # size-1 dims may carry odd strides
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t.view(torch.uint8)


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int):
    """(num_tokens_per_rank [R] int32, num_tokens_per_node [R / ranks_per_node] int32,
    num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)."""
    return native.moe_dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)


def send_positions(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """send_pos [T, R] int64: the send-buffer row of each (token, rank), rank-major then token;
    -1 where the token does not go to that rank."""
    return native.moe_send_positions(is_token_in_rank)


def pack_into(
    out: torch.Tensor,
    payloads: list[torch.Tensor],
    send_pos: torch.Tensor,
    topk_idx: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    experts_per_rank: int = 1,
    expert_base: int = 0,
) -> None:
    """Writes row send_pos[t, r] of out (uint8 [S, row_bytes]) for every sent (token, rank): the
    payloads' bytes, then (with top-k) k local int64 expert indices and k float32 weights."""
    native.moe_dispatch_pack([as_bytes(p) for p in payloads], send_pos, topk_idx, topk_weights, experts_per_rank,
                             expert_base, out)


def row_bytes(payloads: list[torch.Tensor], k: int) -> int:
    """Bytes per packed row: the payloads' bytes plus 12 per top-k slot (int64 index, float32 weight)."""
    return sum(p.shape[1] * p.element_size() for p in payloads) + 12 * k


def pack(
    payloads: list[torch.Tensor],
    is_token_in_rank: torch.Tensor,
    topk_idx: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    experts_per_rank: int,
    expert_base: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send buffer uint8 [S, row_bytes] (rows by destination rank, then token) and send_pos [T, R]."""
    send_pos = send_positions(is_token_in_rank)
    k = topk_idx.shape[1] if topk_idx is not None else 0
    out = is_token_in_rank.new_empty((int(is_token_in_rank.sum()), row_bytes(payloads, k)), dtype=torch.uint8)
    pack_into(out, payloads, send_pos, topk_idx, topk_weights, experts_per_rank, expert_base)
    return out, send_pos


def unpack_into(buf: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """Splits each row of buf into the column segments ``outs`` (contiguous tensors, any dtype)."""
    native.moe_unpack_rows(buf, [as_bytes(o) for o in outs])


def combine_reduce_into(recv: torch.Tensor, send_pos: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] = sum over r of recv[send_pos[t, r]] (rank order; FP32 accumulation, FP64 for float64)."""
    native.moe_combine_reduce(recv, send_pos, out)


def permute(payloads: list[torch.Tensor], topk_idx: torch.Tensor, num_local_experts: int, alignment: int):
    """Expert-major copies of each payload (same dtype), m_indices [M] int32, row_pos [N, k] int64."""
    outs, m_indices, row_pos = native.moe_permute([as_bytes(p) for p in payloads], topk_idx, num_local_experts,
                                                  alignment)
    return [o.view(p.dtype) for o, p in zip(outs, payloads, strict=True)], m_indices, row_pos


def unpermute(y: torch.Tensor, row_pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j weights[n, j] * y[row_pos[n, j]] (FP32 accumulation, FP64 for float64 y)."""
    return native.moe_unpermute(y, row_pos, weights)


@torch.library.register_fake("dsv3::moe_dispatch_layout")
def _layout_fake(topk_idx, num_experts, num_ranks, ranks_per_node):
    t = topk_idx.shape[0]
    i32 = dict(dtype=torch.int32)
    return (topk_idx.new_empty((num_ranks,), **i32), topk_idx.new_empty((num_ranks // ranks_per_node,), **i32),
            topk_idx.new_empty((num_experts,), **i32), topk_idx.new_empty((t, num_ranks), dtype=torch.bool))


@torch.library.register_fake("dsv3::moe_send_positions")
def _send_positions_fake(is_token_in_rank):
    return is_token_in_rank.new_empty(is_token_in_rank.shape, dtype=torch.int64)


@torch.library.register_fake("dsv3::moe_dispatch_pack")
def _pack_fake(payloads, send_pos, topk_idx, topk_weights, experts_per_rank, expert_base, out):
    return None


@torch.library.register_fake("dsv3::moe_unpack_rows")
def _unpack_fake(buf, outs):
    return None


@torch.library.register_fake("dsv3::moe_combine_reduce")
def _combine_reduce_fake(recv, send_pos, out):
    return None


@torch.library.register_fake("dsv3::moe_permute")
def _permute_fake(payloads, topk_idx, num_local_experts, alignment):
    rows = torch.library.get_ctx().new_dynamic_size()
    return ([p.new_empty((rows, p.shape[1])) for p in payloads], topk_idx.new_empty((rows,), dtype=torch.int32),
            topk_idx.new_empty(topk_idx.shape))


@torch.library.register_fake("dsv3::moe_unpermute")
def _unpermute_fake(y, row_pos, weights):
    return y.new_empty((row_pos.shape[0], y.shape[1]))
