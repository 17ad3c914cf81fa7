"""Float64 / all-gather references for dispatch and combine, and the inputs every rank can rebuild.

Each rank's inputs are functions of (test seed, source rank, stream, row, column): a counter-based
hash, so any rank can rebuild exactly the rows of any other rank that it needs, and route them
itself. The reference needs no collective and shares no code with comm/ (routing here is plain
tensor masking, per source rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def _gen(seed: int, src: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + src * 101 + stream) % (2**62))


def hashed_uniform(seed: int, src: int, stream: int, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """float64 [len(rows), cols] uniform in [-1, 1): a splitmix64-style hash of (key, row, column)."""
    key = (seed * 1_000_003 + src * 101 + stream * 7) % (2**61)
    h = (rows.to(torch.int64).unsqueeze(1) * cols + torch.arange(cols, dtype=torch.int64)) ^ key
    for shift, mult in ((30, -4658895280553007687), (27, -7723592293110705685)):
        h = (h ^ (h >> shift)) * mult
    h = h ^ (h >> 31)
    return ((h >> 11) & ((1 << 52) - 1)).double() / 2.0**51 - 1.0


@dataclass(frozen=True)
class Case:
    """One dispatch/combine configuration; tokens[r] is rank r's token count."""

    seed: int
    tokens: tuple[int, ...]
    hidden: int
    k: int
    experts_per_rank: int
    alignment: int = 1

    @property
    def num_ranks(self) -> int:
        return len(self.tokens)

    @property
    def num_experts(self) -> int:
        return self.num_ranks * self.experts_per_rank


@lru_cache(maxsize=256)
def make_topk(case: Case, src: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [T, k] int64 (distinct experts, about 20% of slots -1) and topk_weights float32."""
    g = _gen(case.seed, src, 1)
    t, e, k = case.tokens[src], case.num_experts, case.k
    idx = torch.rand(t, e, generator=g).topk(min(k, e), dim=1).indices
    if k > e:
        idx = torch.cat([idx, torch.full((t, k - e), -1, dtype=torch.int64)], dim=1)
        idx = idx[:, torch.randperm(k, generator=g)]
    idx = idx.masked_fill(torch.rand(t, k, generator=g) < 0.2, -1)
    weights = torch.rand(t, k, generator=g) + 0.05
    return idx.contiguous(), weights


def make_x(case: Case, src: int, dtype: torch.dtype = torch.bfloat16, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows`` (default: all) of src's tokens x [T, H]: values in [-4, 4) times a per-row
    magnitude from 1e-3 to 1e2."""
    rows = torch.arange(case.tokens[src]) if rows is None else rows
    mag = 10.0 ** (hashed_uniform(case.seed, src, 4, rows, 1) * 2.5 + 0.5)
    return (hashed_uniform(case.seed, src, 2, rows, case.hidden) * 4 * mag).to(dtype)


def routed(idx: torch.Tensor, rank: int, epr: int) -> torch.Tensor:
    """[T, k] bool: slot j of token t names an expert on ``rank``."""
    return (idx >= 0) & (idx // epr == rank)


@lru_cache(maxsize=64)
def sent_counts(case: Case) -> torch.Tensor:
    """[R_src, R_dst] tokens each source sends each destination."""
    r = case.num_ranks
    out = torch.zeros(r, r, dtype=torch.int64)
    for src in range(r):
        idx, _ = make_topk(case, src)
        for dst in range(r):
            out[src, dst] = routed(idx, dst, case.experts_per_rank).any(1).sum()
    return out


@dataclass
class Received:
    rows: list[torch.Tensor]  # per payload part: [N, ...]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    per_expert: list[int]


def reference_dispatch(case: Case, rank: int, parts_of) -> Received:
    """What ``rank`` must receive: rows by source rank then token, local top-k, aligned counts.
    ``parts_of(src, rows)`` returns those rows of that source's payload tensors."""
    epr = case.experts_per_rank
    rows, idxs, ws = None, [], []
    counts = torch.zeros(epr, dtype=torch.int64)
    for src in range(case.num_ranks):
        idx, w = make_topk(case, src)
        mask = routed(idx, rank, epr)
        keep = mask.any(1)
        parts = parts_of(src, keep.nonzero().flatten())
        rows = [[] for _ in parts] if rows is None else rows
        for i, p in enumerate(parts):
            rows[i].append(p)
        idxs.append(torch.where(mask, idx - rank * epr, -1)[keep])
        ws.append(torch.where(mask, w, 0.0)[keep])
        for e in range(epr):
            counts[e] += (idx == rank * epr + e).sum()
    a = case.alignment
    return Received([torch.cat(r) for r in rows], torch.cat(idxs), torch.cat(ws),
                    [-(-int(c) // a) * a for c in counts])


def reference_combine(case: Case, rank: int, z_of) -> torch.Tensor:
    """float64 [T, H]: for each token of ``rank``, the sum of the rows every destination holding it
    sends back; ``z_of(dst, rows)`` gives those rows of dst's [N_dst, H] combine input."""
    return reference_node_partials(case, rank, z_of, case.num_ranks)[0]


def reference_node_partials(case: Case, rank: int, z_of, ranks_per_node: int) -> torch.Tensor:
    """float64 [nodes, T, H]: reference_combine's sum split by the node (ranks_per_node
    consecutive ranks) of the destination that sends each row back; rows added in rank order."""
    counts = sent_counts(case)
    idx, _ = make_topk(case, rank)
    out = torch.zeros(case.num_ranks // ranks_per_node, case.tokens[rank], case.hidden, dtype=torch.float64)
    for dst in range(case.num_ranks):
        keep = routed(idx, dst, case.experts_per_rank).any(1)
        if not keep.any():
            continue
        first = int(counts[:rank, dst].sum())
        out[dst // ranks_per_node, keep] += z_of(dst, torch.arange(first, first + int(keep.sum()))).double()
    return out


def make_z(case: Case, dst: int, rows: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows of dst's combine input (its experts' already-weighted outputs), rebuilt anywhere."""
    return (hashed_uniform(case.seed, dst, 3, rows, case.hidden) * 2).to(dtype)


def dequantize(q: torch.Tensor, sf: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The model's dequantize step (payload times its 1x128 tile's scale)."""
    return (q.float() * sf.repeat_interleave(128, dim=1)[:, : q.shape[1]]).to(dtype)


def equal_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same bytes, on any devices (flattened first: torch may give an empty
    [0, 1] tensor stride 0, which a dtype view refuses)."""
    if a.shape != b.shape:
        return False
    return torch.equal(*(t.cpu().flatten().contiguous().view(torch.uint8) for t in (a, b)))
