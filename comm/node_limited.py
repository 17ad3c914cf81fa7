"""Node-limited (hierarchical) dispatch and combine: ranks r // ranks_per_node form a node.

Dispatch, stage 1 (across nodes): a token crosses to each destination node ONCE, to the rank
with the sender's local index, carrying its global top-k and its source token index. Stage 2
(inside the node): that rank forwards it to the node's ranks that hold its experts. The rows are
then put in the flat mode's order (source rank, then source token), so the results equal the
flat mode's exactly. Combine runs the stages in reverse: the node's partial sums are added on the
forwarding rank (FP32, rounded to x's dtype), cross back once, and are added again at the source.
This is the traffic pattern of DeepSeek-V3's routing to at most 4 nodes.

Asynchrony: dispatch's cross-node stage is synchronous and its in-node stage async; combine's
in-node stage is synchronous and its cross-node stage async.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm import transfer
from comm.events import EventOverlap
from comm.layout import DispatchHandle

__all__ = ["NodeLimited"]


@dataclass(frozen=True, eq=False)
class _Stage:
    in_rank: torch.Tensor  # [rows, G] bool
    send_pos: torch.Tensor  # [rows, G] int64
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class NodeHandle:
    cross: _Stage  # tokens -> one rank per destination node
    intra: _Stage  # stage-1 rows -> the node's expert ranks
    num_forwarded: int  # N1, rows this rank received in stage 1
    order: torch.Tensor  # [N] int64: final row i is stage-2 row order[i]


class NodeLimited:
    """The two process groups of a rank in node-limited mode, and the two-stage exchanges."""

    def __init__(self, buffer):
        self.buffer = buffer
        p, nodes = buffer.ranks_per_node, buffer.num_nodes
        ranks = dist.get_process_group_ranks(buffer.group) if buffer.group is not None else list(
            range(dist.get_world_size()))
        self.node, self.local = divmod(buffer.rank, p)
        backend = dist.get_backend(buffer.group)
        for local in range(p):  # every rank creates every group, in the same order
            g = dist.new_group([ranks[n * p + local] for n in range(nodes)], backend=backend)
            if local == self.local:
                self.cross = g
        for node in range(nodes):
            g = dist.new_group([ranks[node * p + local] for local in range(p)], backend=backend)
            if node == self.node:
                self.intra = g

    def _counts(self, send: torch.Tensor, group) -> torch.Tensor:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv

    def dispatch(self, x, parts, topk_idx, topk_weights, num_experts, in_rank, alignment, async_finish):
        b = self.buffer
        p, nodes, t = b.ranks_per_node, b.num_nodes, parts[0].shape[0]
        epr = num_experts // b.group_size
        device = parts[0].device
        weights = topk_weights if topk_weights is not None else torch.zeros(topk_idx.shape, dtype=torch.float32,
                                                                            device=device)
        # Stage 1: once per destination node, with global top-k and source token index.
        in_node = in_rank.view(t, nodes, p).any(2).contiguous()
        s1_send = in_node.sum(0)
        s1_recv = self._counts(s1_send.to(torch.int64), self.cross)
        token_ids = torch.arange(t, dtype=torch.int64, device=device).unsqueeze(1)
        recv1, _, pos1 = transfer.move([*parts, topk_idx, weights.contiguous(), token_ids], in_node,
                                       tuple(s1_send.tolist()), tuple(s1_recv.tolist()), None, None, 1, False,
                                       group=self.cross)
        *parts1, idx1, w1, tok1 = recv1
        n1 = idx1.shape[0]
        src_rank1 = (torch.repeat_interleave(torch.arange(nodes, device=device), s1_recv) * p + self.local)

        # Stage 2: forward inside the node to the ranks holding the experts.
        dest = torch.div(idx1, epr, rounding_mode="floor")
        here = (idx1 >= 0) & (torch.div(dest, p, rounding_mode="floor") == self.node)
        local_dest = torch.where(here, dest % p, p)  # p = "nowhere" column, dropped below
        in_rank2 = torch.zeros((n1, p + 1), dtype=torch.bool, device=device)
        in_rank2.scatter_(1, local_dest, True)
        in_rank2 = in_rank2[:, :p].contiguous()
        expert_counts = torch.zeros((p, epr + 1), dtype=torch.int64, device=device)
        expert_counts[:, 0] = in_rank2.sum(0)
        first = self.node * p * epr
        local_expert = torch.where(here, idx1 - first, 0)
        flat = (local_expert[here]).flatten()
        expert_counts[:, 1:] = torch.bincount(flat, minlength=p * epr).view(p, epr)
        recv_counts = self._counts(expert_counts, self.intra)
        s2_send, s2_recv = tuple(in_rank2.sum(0).tolist()), tuple(recv_counts[:, 0].tolist())
        counts_list = [-(-c // alignment) * alignment for c in recv_counts[:, 1:].sum(0).tolist()]
        recv2, event, pos2 = transfer.move([*parts1, src_rank1.unsqueeze(1), tok1], in_rank2, s2_send, s2_recv,
                                           idx1, w1, epr, async_finish, group=self.intra, expert_base=first)
        *parts2, src2, tok2, idx2, w2 = recv2
        n2 = idx2.shape[0]
        order = torch.empty(n2, dtype=torch.int64, device=device)
        outs = [torch.empty_like(q) for q in [*parts2, idx2, w2]]

        def reorder() -> None:  # flat order: source rank, then source token
            key = src2[:, 0] * (max(tok2.max().item(), 0) + 1 if n2 else 1) + tok2[:, 0]
            order.copy_(torch.argsort(key, stable=True))
            for out, raw in zip(outs, [*parts2, idx2, w2], strict=True):
                out.copy_(raw[order])

        event = event.then(reorder)
        handle = DispatchHandle(b._owner, b.group_size, t, n2, in_rank, pos1, (), (), node=NodeHandle(
            _Stage(in_node, pos1, tuple(s1_send.tolist()), tuple(s1_recv.tolist())),
            _Stage(in_rank2, pos2, s2_send, s2_recv), n1, order))
        recv_x = b._form(x, outs[: len(parts)])
        return (recv_x, outs[-2], outs[-1] if topk_weights is not None else None, counts_list, handle,
                event if async_finish else EventOverlap())

    def dispatch_with_handle(self, x, parts, handle, async_finish):
        b, nh = self.buffer, handle.node
        recv1, _, _ = transfer.move(parts, nh.cross.in_rank, nh.cross.send_splits, nh.cross.recv_splits, None, None,
                                    1, False, group=self.cross)
        recv2, event, _ = transfer.move(recv1, nh.intra.in_rank, nh.intra.send_splits, nh.intra.recv_splits, None,
                                        None, 1, async_finish, group=self.intra)
        outs = [torch.empty_like(q) for q in recv2]

        def reorder() -> None:
            for out, raw in zip(outs, recv2, strict=True):
                out.copy_(raw[nh.order])

        event = event.then(reorder)
        return b._form(x, outs), None, None, None, None, (event if async_finish else EventOverlap())

    def combine(self, x, handle, topk_weights, async_finish):
        nh = handle.node
        tensors = []
        for t in (x, topk_weights):
            if t is None:
                tensors.append(None)
                continue
            unordered = torch.empty_like(t)
            unordered[nh.order] = t  # back to stage-2 arrival order
            tensors.append(unordered)
        s = nh.intra
        *partials, _ = transfer.send_back(tensors, s.send_pos, s.send_splits, s.recv_splits, nh.num_forwarded,
                                          self.intra, False)
        s = nh.cross
        return transfer.send_back(partials, s.send_pos, s.send_splits, s.recv_splits, handle.num_tokens, self.cross,
                                  async_finish)
