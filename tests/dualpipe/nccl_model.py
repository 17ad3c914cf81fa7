"""A small model of NCCL's point-to-point semantics: checks a pipeline's P2P groups without a GPU.

The model (the rules ``dualpipe.comm`` is written to):

- each rank runs its groups in posting order on ONE stream (batched P2P on NCCL uses the
  communicator of the whole process group, one stream per rank): group ``g`` starts only when
  group ``g - 1`` has completed; a rank's first group starts at once;
- matching is by per-pair posting order: the i-th send from rank a to rank b pairs with the i-th
  receive on b from a (tags are ignored), and the two must have the same size;
- an op completes once its matching op is posted, i.e. the peer's group holding it has started
  (it is the peer's current group, or an earlier one); a group completes when all its ops have.

One stream per rank is the stricter reading: with one stream per peer pair instead, every wait
here is still a wait there or none, so a sequence that passes here passes there too.
``check_groups`` raises ``Mismatch`` (counts or sizes of a pair differ) or ``Deadlock`` (the
stuck groups, named); a sequence that passes finishes on every rank with every message matched.
"""

from __future__ import annotations

from collections.abc import Sequence

Op = tuple[str, int, int]  # ("send" | "recv", peer rank, bytes)


class Mismatch(AssertionError):
    """Two ranks disagree on the messages between them (count or size, by posting order)."""


class Deadlock(AssertionError):
    """Some ranks can never complete their current group."""


def check_groups(groups: Sequence[Sequence[Sequence[Op]]]) -> int:
    """``groups[r]``: rank r's posted groups in order, each a list of ops. Returns the number of
    rounds the model needed (every rank advances as far as it can per round); raises
    ``Mismatch`` or ``Deadlock``."""
    n = len(groups)
    posted: dict[tuple[str, int, int], list[tuple[int, int]]] = {}  # (kind, rank, peer) -> [(group, bytes)]
    for r, gs in enumerate(groups):
        for g, ops in enumerate(gs):
            for kind, peer, nbytes in ops:
                if kind not in ("send", "recv") or not 0 <= peer < n or peer == r or nbytes < 0:
                    raise ValueError(f"rank {r} group {g}: bad op {(kind, peer, nbytes)}")
                posted.setdefault((kind, r, peer), []).append((g, nbytes))
    # needs[r][g]: for each op of rank r's group g, (peer, the peer's group holding its match)
    needs: list[list[list[tuple[int, int]]]] = [[[] for _ in gs] for gs in groups]
    for a in range(n):
        for b in range(n):
            sends, recvs = posted.get(("send", a, b), []), posted.get(("recv", b, a), [])
            if len(sends) != len(recvs):
                raise Mismatch(f"rank {a} posts {len(sends)} sends to rank {b}, which posts {len(recvs)} receives from it")
            for i, ((gs, ns), (gr, nr)) in enumerate(zip(sends, recvs, strict=True)):
                if ns != nr:
                    raise Mismatch(f"message {i} from rank {a} to rank {b}: {ns} bytes sent (group {gs}) into a "
                                   f"{nr}-byte receive (group {gr})")
                needs[a][gs].append((b, gr))
                needs[b][gr].append((a, gs))
    cur = [0] * n  # each rank's current (started, not completed) group
    rounds = 0
    moved = True
    while moved:
        moved = False
        rounds += 1
        for r in range(n):
            while cur[r] < len(groups[r]) and all(cur[p] >= pg for p, pg in needs[r][cur[r]]):
                cur[r] += 1
                moved = True
    stuck = [r for r in range(n) if cur[r] < len(groups[r])]
    if stuck:
        lines = []
        for r in stuck:
            waiting = sorted({(p, pg) for p, pg in needs[r][cur[r]] if cur[p] < pg})
            lines.append(f"rank {r} group {cur[r]} {list(groups[r][cur[r]])} waits for "
                         + ", ".join(f"rank {p}'s group {pg} (it is at {cur[p]})" for p, pg in waiting))
        raise Deadlock("; ".join(lines))
    return rounds
