"""``Buffer``: expert-parallel dispatch and combine with DeepEP's API, on any backend.

Dispatch sends each token to every rank that holds at least one of its top-k experts (once per
rank), as raw bytes; received rows are ordered by source rank, then by source token. The
receiver counts its tokens per expert from the top-k it received, so no per-expert count
exchange is needed. Combine sends each received row back and sums, per token, the rows from
every rank that received it, in FP32 (FP64 for float64 rows).

This file is the API: arguments, their checks, and what each call returns. The checks run
before any collective, and a bad input on one rank raises on every rank (``agree_on_errors``)
instead of leaving its peers blocked. How the rows travel (packing, the exchanges, reused
buffers, the cost model) is comm/transfer.py; the node-limited mode's two stages are
comm/node_limited.py.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from comm import kernels, transfer
from comm.events import EventOverlap, wait_previous
from comm.guarded import CallSignature, Guard, SignatureField, fail_guarded
from comm.layout import DispatchHandle, check_topk, new_owner_id
from comm.primitives import agree_no_error
from ops.checks import check_dim, check_dtype, check_positive_int, check_tensor

__all__ = ["Buffer"]

# What argument checks raise (ops.checks, and the layout kernel's own shape checks). A call catches
# them instead of raising at once, so that a rank with bad input still takes part in the collectives
# its peers enter, and every rank raises (see ``agree_on_errors``).
_INPUT_ERRORS = (TypeError, ValueError, RuntimeError)


def _payload_parts(x: object) -> list[torch.Tensor]:
    """x [T, H] float tensor (kernels.FLOAT_DTYPES), or (x_fp8 [T, H] e4m3, scales [T, ceil(H/128)]
    float32) -> rows to move."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"an FP8 x must be a (x_fp8, scales) pair, got a tuple of {len(x)}")
        q, sf = check_tensor("x[0] (x_fp8)", x[0]), check_tensor("x[1] (scales)", x[1])
        check_dtype("x[0] (x_fp8)", q, (torch.float8_e4m3fn,))
        check_dim("x[0] (x_fp8)", q, 2)
        check_dtype("x[1] (scales)", sf, (torch.float32,))
        expected = (q.shape[0], -(-q.shape[1] // 128))
        if tuple(sf.shape) != expected:
            raise ValueError(f"x[1] (scales) must have shape {expected} (1x128 tiles of x_fp8), got {tuple(sf.shape)}")
        if q.shape[1] == 0:
            raise ValueError("x must have at least one column")
        return [q.contiguous(), sf.contiguous()]
    x = check_tensor("x", x)
    check_dtype("x", x, kernels.FLOAT_DTYPES)
    check_dim("x", x, 2)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one column")
    return [x.contiguous()]


_SIGNATURE_DTYPES = (*kernels.FLOAT_DTYPES, torch.float8_e4m3fn)
_SIGNATURE_DTYPE_NAMES = tuple(str(d) for d in _SIGNATURE_DTYPES)


def _dispatch_signature(parts: list[torch.Tensor] | None = None, topk_idx: torch.Tensor | None = None,
                        num_experts: int = 0) -> CallSignature:
    """What every rank's dispatch must agree on (checked on the count exchange, comm/guarded.py);
    all zeros for a rank with bad input (its error flag is what its peers read)."""
    form = dtype = hidden = k = 0
    if parts:
        form, dtype, hidden = len(parts) - 1, _SIGNATURE_DTYPES.index(parts[0].dtype), parts[0].shape[1]
        k = topk_idx.shape[1]
    return CallSignature("dispatch", (
        SignatureField("forms of x", form, ("a tensor", "an (x_fp8, scales) pair")),
        SignatureField("dtypes of x", dtype, _SIGNATURE_DTYPE_NAMES),
        SignatureField("hidden sizes (x.shape[1])", hidden),
        SignatureField("num_experts", num_experts),
        SignatureField("top-k widths (topk_idx.shape[1])", k),
    ))


def _env_check() -> bool:
    """DSV3_COMM_CHECK: '1' turns Buffer's check_consistency on, '0' or unset leaves it off."""
    value = os.environ.get("DSV3_COMM_CHECK", "0")
    if value not in ("0", "1"):
        raise ValueError(f"DSV3_COMM_CHECK must be 0 or 1, got {value!r}")
    return value == "1"


class Buffer:
    """Binds a process group for dispatch/combine (DeepEP's ``deep_ep.Buffer`` API).

    Args:
        group: the expert-parallel process group (default: the world). Any backend.
        num_nvl_bytes, num_rdma_bytes: accepted for DeepEP compatibility; buffers here are
            sized per call.
        ranks_per_node: enables the node-limited (hierarchical) mode: ranks r // ranks_per_node
            form a node; a token crosses to each destination node once and is forwarded inside
            it. None (default) is the flat mode.
        agree_on_errors: make bad input on one rank raise on every rank (instead of leaving the
            others blocked in the collective). A dispatch without a handle carries the error
            flags in its count exchange, with the arguments the ranks must pass alike (x's
            form, dtype and hidden size, num_experts, the top-k width: ranks that disagree all
            raise CollectiveInputError, whatever this flag says); a dispatch with a handle and
            a combine (flat mode, sync or async) carry them in a tiny header all-to-all
            launched together with the payload (comm/guarded.py: no extra round trip); the
            node-limited mode exchanges the flags first in synchronous calls and skips them in
            async ones. False: no agreement (unless check_consistency).
        check_consistency: flat mode only (the node-limited mode ignores it), a debugging aid:
            before a dispatch with a handle or a combine moves any payload, the ranks gather
            every exchange's byte counts and element types and check them (one blocking round
            trip: dispatch+combine 0.92-1.03x the default's speed in three runs on 4 CPU ranks,
            bench_comm.py; async calls block for it too): ranks that
            disagree (hidden sizes, dtypes, handles of different dispatches, topk_weights on
            some ranks only) all raise CollectiveInputError instead of gloo aborting the process
            (NCCL: hanging or corrupting). It must be the same on every rank. Default: the
            DSV3_COMM_CHECK environment variable (0 or 1; unset: off).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *,
                 ranks_per_node: int | None = None, agree_on_errors: bool = True,
                 check_consistency: bool | None = None):
        if not dist.is_initialized():
            raise RuntimeError("Buffer needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.ranks_per_node = self.group_size if ranks_per_node is None else check_positive_int("ranks_per_node",
                                                                                                 ranks_per_node)
        if self.group_size % self.ranks_per_node:
            raise ValueError(f"ranks_per_node ({self.ranks_per_node}) must divide the group size ({self.group_size})")
        self.num_nodes = self.group_size // self.ranks_per_node
        self.agree_on_errors = bool(agree_on_errors)
        self.check_consistency = _env_check() if check_consistency is None else bool(check_consistency)
        self._owner = new_owner_id()
        backend = dist.get_backend(group)
        self._count_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._node = None
        if ranks_per_node is not None and self.num_nodes > 1:
            from comm.node_limited import NodeLimited

            self._node = NodeLimited(self)

    # ----------------------------------------------------------------------------- layout
    def _check_num_experts(self, num_experts: object) -> int:
        num_experts = check_positive_int("num_experts", num_experts)
        if num_experts % self.group_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of ranks ({self.group_size})")
        return num_experts

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts and routing of this rank's tokens (local computation, no communication).

        Args:
            topk_idx: [T, k] int64 global expert indices, -1 for "no expert".
            num_experts: E, divisible by the group size.

        Returns:
            (num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [nodes] int32 in the
            node-limited mode else None, num_tokens_per_expert [E] int32,
            is_token_in_rank [T, R] bool, event).
        """
        wait_previous(previous_event)
        num_experts = self._check_num_experts(num_experts)
        check_topk(topk_idx, None, getattr(topk_idx, "shape", (0,))[0], num_experts)
        per_rank, per_node, per_expert, in_rank = kernels.dispatch_layout(
            topk_idx.contiguous(), num_experts, self.group_size, self.ranks_per_node)
        return per_rank, (per_node if self._node is not None else None), per_expert, in_rank, EventOverlap()

    # ----------------------------------------------------------------------------- dispatch
    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank: torch.Tensor | None = None,
                 num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
                 num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, expert_alignment: int = 1,
                 previous_event: EventOverlap | None = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, num_experts: int | None = None):
        """Sends each token to the ranks holding its experts.

        Args:
            x: [T, H] float32/bfloat16/float16/float64, or (x_fp8 [T, H] float8_e4m3fn, scales
                [T, ceil(H/128)] float32, any strides).
            handle: from an earlier dispatch: repeat its layout (x may differ in H and dtype).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: get_dispatch_layout's
                outputs; computed here from topk_idx when not given.
            num_tokens_per_rdma_rank: accepted for compatibility (recomputed internally).
            topk_idx: [T, k] int64 global expert indices (-1: none). Required without handle.
            topk_weights: [T, k] float32 or None.
            expert_alignment: round each per-expert receive count up to a multiple of this.
            previous_event: finished before starting.
            async_finish: return before the data arrives; the returned tensors hold their values
                after ``event.current_stream_wait()``. (The count exchange that sizes the receive
                buffers and the small top-k message that num_recv_tokens_per_expert_list is
                counted from are synchronous, as in DeepEP's normal mode; the payload is not.
                With a handle nothing is, but for check_consistency's round trip.)
            allocate_on_comm_stream: accepted for compatibility.
            num_experts: E when num_tokens_per_expert is not given.

        Returns:
            (recv_x, recv_topk_idx [N, k] int64 local (-1 elsewhere), recv_topk_weights [N, k]
            float32 (0.0 where recv_topk_idx is -1) or None, num_recv_tokens_per_expert_list
            (list of ints, rounded up to expert_alignment), handle, event). recv_x has x's form
            (a tensor, or an (x_fp8, scales) pair); rows are ordered by source rank, then by
            source token index. With ``handle``: (recv_x, None, None, None, None, event).
        """
        wait_previous(previous_event)
        error, parts = None, []
        try:
            parts = _payload_parts(x)
            if handle is not None:
                self._check_handle(handle, parts[0].shape[0], "x")
        except _INPUT_ERRORS as err:
            error = err
        if handle is not None:
            if self._node is not None:
                self._agree(error, "dispatch", async_finish)
                return self._node.dispatch_with_handle(x, parts, handle, async_finish)
            guarded = self._guard(error, "dispatch", transfer.MOVE_EXCHANGES)
            recv_parts, event, _ = transfer.move(parts, handle.is_token_in_rank, handle.send_splits,
                                                 handle.recv_splits, None, None, 1, async_finish, self.group,
                                                 guarded=guarded, count_device=self._count_device)
            return self._form(x, recv_parts), None, None, None, None, event

        per_rank = in_rank = None
        if error is None:
            try:
                num_experts, topk_idx, per_rank, in_rank = self._checked_layout(
                    parts[0].shape[0], topk_idx, topk_weights, num_experts, num_tokens_per_expert, num_tokens_per_rank,
                    is_token_in_rank, expert_alignment)
            except _INPUT_ERRORS as err:
                error = err
        # Everyone exchanges counts (and error flags): rank r learns how many rows each peer sends.
        # In flat mode the send buffers are packed while the counts travel (packing needs none).
        signature = _dispatch_signature(parts, topk_idx, num_experts) if error is None else _dispatch_signature()
        counts_arrived = transfer.start_count_exchange(per_rank, self.group, self._count_device, error, signature)
        packed = None
        if error is None and self._node is None:
            experts_per_rank = num_experts // self.group_size
            weights = (topk_weights.contiguous() if topk_weights is not None
                       else torch.zeros(topk_idx.shape, dtype=torch.float32, device=topk_idx.device))
            send_splits = tuple(per_rank.tolist())
            packed = transfer.pack(parts, in_rank, send_splits, topk_idx, weights, experts_per_rank)
        try:
            recv_counts = counts_arrived()
        except BaseException:  # another rank's bad input (CollectiveInputError) or a backend error
            if packed is not None:
                packed.release()
            raise
        if self._node is not None:
            return self._node.dispatch(x, parts, topk_idx, topk_weights, num_experts, in_rank, expert_alignment,
                                       async_finish)
        recv_splits = tuple(recv_counts.tolist())
        recv_parts, event, send_pos = transfer.move(parts, in_rank, send_splits, recv_splits, topk_idx, weights,
                                                    experts_per_rank, async_finish, self.group, wait_side=True,
                                                    packed=packed)
        handle = DispatchHandle(self._owner, self.group_size, parts[0].shape[0], sum(recv_splits), in_rank, send_pos,
                                send_splits, recv_splits)
        recv_x = self._form(x, recv_parts[: len(parts)])
        recv_idx, recv_w = recv_parts[len(parts):]
        # Tokens per local expert, counted from the received top-k (each (token, expert) pair arrives
        # exactly once): the same numbers the senders' num_tokens_per_expert add up to.
        per_expert_recv = torch.bincount(recv_idx[recv_idx >= 0], minlength=experts_per_rank)
        align = expert_alignment
        counts_list = [-(-c // align) * align for c in per_expert_recv.tolist()]
        return recv_x, recv_idx, (recv_w if topk_weights is not None else None), counts_list, handle, event

    def _checked_layout(self, num_tokens: int, topk_idx: object, topk_weights: object, num_experts: object,
                        num_tokens_per_expert: object, num_tokens_per_rank: object, is_token_in_rank: object,
                        expert_alignment: object) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A dispatch's routing arguments, checked, and its layout computed from topk_idx. Layout
        tensors the caller passed (get_dispatch_layout's outputs) must match it: they are checked,
        never trusted, since a wrong count would size a receive buffer wrongly on a peer.

        Returns (num_experts, topk_idx (contiguous), num_tokens_per_rank [R] int32,
        is_token_in_rank [T, R] bool)."""
        if num_experts is None and num_tokens_per_expert is None:
            raise ValueError("dispatch without a handle needs num_tokens_per_expert (from get_dispatch_layout) "
                             "or num_experts")
        num_experts = self._check_num_experts(num_experts if num_experts is not None
                                              else check_tensor("num_tokens_per_expert", num_tokens_per_expert).numel())
        check_topk(topk_idx, topk_weights, num_tokens, num_experts)
        check_positive_int("expert_alignment", expert_alignment)
        topk_idx = topk_idx.contiguous()
        per_rank, _, per_expert, in_rank = kernels.dispatch_layout(topk_idx, num_experts, self.group_size,
                                                                   self.ranks_per_node)
        if is_token_in_rank is not None and not torch.equal(check_tensor("is_token_in_rank", is_token_in_rank), in_rank):
            raise ValueError("is_token_in_rank does not match topk_idx (pass get_dispatch_layout's output for "
                             "this topk_idx)")
        if num_tokens_per_rank is not None and not torch.equal(
                check_tensor("num_tokens_per_rank", num_tokens_per_rank).to(per_rank.device, per_rank.dtype),
                per_rank):
            raise ValueError("num_tokens_per_rank does not match topk_idx")
        if num_tokens_per_expert is not None and not torch.equal(
                check_tensor("num_tokens_per_expert", num_tokens_per_expert).to(per_expert.device, per_expert.dtype),
                per_expert):
            raise ValueError("num_tokens_per_expert does not match topk_idx")
        return num_experts, topk_idx, per_rank, in_rank

    @staticmethod
    def _form(x: object, parts: list[torch.Tensor]):
        """Received parts in the form x came in: a tensor, or an (x_fp8, scales) pair."""
        return (parts[0], parts[1]) if isinstance(x, tuple) else parts[0]

    def _check_handle(self, handle: object, rows: int, what: str, recv_side: bool = False) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be the DispatchHandle a dispatch returned, got {type(handle).__name__}")
        if handle.owner != self._owner:
            raise ValueError("handle comes from another Buffer (another group or layout); use the handle this "
                             "Buffer's dispatch returned")
        expected = handle.num_recv_tokens if recv_side else handle.num_tokens
        if rows != expected:
            side = "received" if recv_side else "sent"
            raise ValueError(f"{what} has {rows} rows but the handle's layout {side} {expected} tokens on this rank "
                             "(a handle from another layout?)")

    def _guard(self, error: BaseException | None, what: str, num_exchanges: int) -> Guard:
        """Flat mode: how this call's exchanges carry the error agreement (comm/guarded.py; no
        extra round trip unless check_consistency). A rank with bad input takes part in its
        peers' exchanges, then raises here."""
        mode = Guard.STRICT if self.check_consistency else Guard.HEADER if self.agree_on_errors else Guard.OFF
        if error is None:
            return mode
        if mode is not Guard.OFF:
            fail_guarded(error, num_exchanges, self.group, what, self._count_device, strict=mode == Guard.STRICT)
        raise error

    def _agree(self, error: BaseException | None, what: str, async_finish: bool) -> None:
        # Node-limited mode (two dependent stages): a round trip of error flags first. An async
        # call must not wait for its peers, so it skips it: bad input on one rank alone then
        # surfaces on the others as the backend's collective timeout.
        if self.agree_on_errors and not async_finish:
            agree_no_error(self.group, error, self._count_device, what)
        elif error is not None:
            raise error

    # ----------------------------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None = None,
                previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Sends each received row back to its source rank and sums them per token (FP32; FP64 for
        float64 x).

        No weights are applied: each rank sends back its already-weighted partial result.

        Args:
            x: [N, H] float32/bfloat16/float16/float64, one row per received token (dispatch's order).
            handle: the dispatch's handle.
            topk_weights: [N, k] float32 or None; summed the same way.
            previous_event, async_finish, allocate_on_comm_stream: as in dispatch.

        Returns:
            (combined_x [T, H] in x's dtype, combined_topk_weights [T, k] float32 or None, event).
            A token no rank received combines to zeros.
        """
        wait_previous(previous_event)
        error = None
        try:
            x = check_tensor("x", x)
            check_dtype("x", x, kernels.FLOAT_DTYPES)
            check_dim("x", x, 2)
            self._check_handle(handle, x.shape[0], "x", recv_side=True)
            if topk_weights is not None:
                topk_weights = check_tensor("topk_weights", topk_weights)
                check_dtype("topk_weights", topk_weights, (torch.float32,))
                check_dim("topk_weights", topk_weights, 2)
                if topk_weights.shape[0] != x.shape[0]:
                    raise ValueError(f"topk_weights must have x's {x.shape[0]} rows, got shape {tuple(topk_weights.shape)}")
        except _INPUT_ERRORS as err:
            error = err
        if self._node is not None:
            self._agree(error, "combine", async_finish)
            return self._node.combine(x, handle, topk_weights, async_finish)
        sent_back = [x, topk_weights]  # one exchange each (None: launched as absent)
        guarded = self._guard(error, "combine", len(sent_back))
        return transfer.send_back(sent_back, handle.send_pos, handle.send_splits, handle.recv_splits,
                                  handle.num_tokens, self.group, async_finish, guarded=guarded,
                                  count_device=self._count_device)
