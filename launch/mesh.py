"""The parallel layout as a DeviceMesh: pipeline x (expert-data-parallel x expert-parallel).

Global rank = pp_rank * dp + dp_rank, with dp_rank = edp_rank * ep + ep_rank: data-parallel and
expert-parallel peers are neighbouring ranks (the same node when they fit), pipeline stages
stride across nodes, as in DeepSeek-V3's layout.

Groups (each created once, all with the configured collective timeout):
- ``pp``:  ranks of one pipeline (same dp_rank), for P2P between stages;
- ``dp``:  data-parallel ranks of one pipeline stage: non-expert gradients and ZeRO-1 shards;
- ``ep``:  expert-parallel ranks (consecutive dp ranks): the model's dispatch/combine group;
- ``edp``: ranks holding the same experts (same ep_rank): expert gradients and their ZeRO shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


@dataclass
class ParallelGroups:
    rank: int
    world: int
    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    mesh: DeviceMesh | None  # dims ("pp", "edp", "ep")

    @property
    def edp(self) -> int:
        return self.dp // self.ep


def rank_grid(pp: int, dp: int, ep: int) -> torch.Tensor:
    """[pp, dp/ep, ep] global ranks."""
    return torch.arange(pp * dp).reshape(pp, dp // ep, ep)


def build_groups(pp: int, dp: int, ep: int, device_type: str, timeout_s: float) -> ParallelGroups:
    """Creates every group on every rank (new_group is collective), in one fixed order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != pp * dp or dp % ep:
        raise ValueError(f"world {world} does not match pp {pp} x dp {dp} with ep {ep}")
    grid = rank_grid(pp, dp, ep)
    timeout = timedelta(seconds=timeout_s)
    mine: dict[str, dist.ProcessGroup] = {}

    def make(kind: str, rank_lists: list[list[int]]) -> None:
        for ranks in rank_lists:
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = g

    make("pp", [grid[:, e, x].tolist() for e in range(dp // ep) for x in range(ep)])
    make("dp", [grid[p].flatten().tolist() for p in range(pp)])
    make("ep", [grid[p, e].tolist() for p in range(pp) for e in range(dp // ep)])
    make("edp", [grid[p, :, x].tolist() for p in range(pp) for x in range(ep)])

    pp_rank, rem = divmod(rank, dp)
    edp_rank, ep_rank = divmod(rem, ep)
    mesh = None
    try:
        mesh = DeviceMesh.from_group([mine["pp"], mine["edp"], mine["ep"]], device_type, mesh=grid,
                                     mesh_dim_names=("pp", "edp", "ep"))
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        mesh = None  # the groups above are what the trainer uses; the mesh is for inspection and DCP
    return ParallelGroups(rank=rank, world=world, pp=pp, dp=dp, ep=ep, pp_rank=pp_rank, dp_rank=rem,
                          ep_rank=ep_rank, edp_rank=edp_rank, pp_group=mine["pp"], dp_group=mine["dp"],
                          ep_group=mine["ep"], edp_group=mine["edp"], mesh=mesh)
