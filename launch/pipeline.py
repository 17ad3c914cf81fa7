"""Pipeline parallel for the trainer: the model's stage modules under a dualpipe schedule.

Placement (``parallel.schedule``), with N pipeline ranks:
- ``dualpipev`` (default): 2N stages, rank r holds stages (r, 2N-1-r); data and loss on rank 0.
- ``dualpipe``: N stages, rank r holds (r, N-1-r), as does its mirror N-1-r: half the micro-batches
  enter at each end; the mirrors' gradients (and expert loads) are summed before the update.
- ``1f1b`` / ``zb1p``: N stages, one per rank; data on rank 0, loss on rank N-1.

Tied embedding: MTP uses the embedding of stage 0. Where the last stage shares a rank with stage
0 (DualPipe, DualPipeV) it uses that very module; otherwise (1F1B, ZB1P) the last stage holds a
copy whose gradient is summed with stage 0's over a two-rank group, so both copies stay equal;
the copy is left out of the gradient norm so that the embedding counts once.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from launch.config import Config, Layout
from launch.mesh import ParallelGroups, rank_grid


def stage_ids(schedule: str, pp: int, pp_rank: int) -> list[int]:
    if schedule == "dualpipev":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    if schedule == "dualpipe":
        return [pp_rank, pp - 1 - pp_rank]
    return [pp_rank]


def _own_group(rank_lists: list[list[int]], rank: int, timeout) -> dist.ProcessGroup | None:
    """Creates a group per rank list (every rank calls new_group for every list); returns ours."""
    mine = None
    for ranks in rank_lists:
        g = dist.new_group(sorted(set(ranks)), timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


class PipelineRunner:
    def __init__(self, pkg, args, cfg: Config, layout: Layout, groups: ParallelGroups,
                 ep_group: dist.ProcessGroup | None, device: torch.device, full_state: dict | None) -> None:
        import dualpipe
        from model.ep import shard_state_dict
        from model.pipeline import StageCriterion, build_stage

        self.cfg, self.layout, self.g, self.args = cfg, layout, groups, args
        self.schedule = cfg.parallel.schedule
        pp, r = layout.pp, groups.pp_rank
        n_stages = layout.stages
        self.ids = stage_ids(self.schedule, pp, r)
        slot_groups = self._slot_ep_groups(ep_group, groups, layout, cfg.parallel.timeout_s)
        built: dict[int, nn.Module] = {}
        for sid in sorted(self.ids):  # stage 0 first: the last stage may reuse its embedding
            share = built[0].embed if (sid == n_stages - 1 and 0 in built) else None
            built[sid] = build_stage(args, sid, n_stages, ep_group=slot_groups[self.ids.index(sid)], mtp_embed=share)
        if full_state is not None:  # weights independent of the layout (tests compare layouts)
            for m in built.values():
                m.load_state_dict(shard_state_dict(full_state, m), strict=False)
                if m.mtp_embed is not None and (0 not in built):
                    m.mtp_embed.weight.data.copy_(full_state["embed.weight"])
        self.stages = [built[s].to(device) for s in self.ids]
        self.criterion = StageCriterion(args)

        grid = rank_grid(pp, layout.dp, layout.ep).reshape(pp, layout.dp)
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        self.mirror_group = None
        self.tie_group = None
        if self.schedule == "dualpipe":
            pairs = [[int(grid[p, d]), int(grid[pp - 1 - p, d])] for d in range(layout.dp) for p in range(pp // 2)]
            self.mirror_group = _own_group(pairs, groups.rank, timeout)
        elif self.schedule in ("1f1b", "zb1p") and args.n_mtp_layers > 0:
            pairs = [[int(grid[0, d]), int(grid[pp - 1, d])] for d in range(layout.dp)]
            self.tie_group = _own_group(pairs, groups.rank, timeout)

        cls = {"dualpipev": dualpipe.DualPipeV, "dualpipe": dualpipe.DualPipe, "1f1b": dualpipe.OneFOneB,
               "zb1p": dualpipe.ZB1P}[self.schedule]
        self.pipe = cls(self.stages if len(self.stages) > 1 else self.stages[0], process_group=groups.pp_group)

    def _slot_ep_groups(self, ep_group: dist.ProcessGroup | None, groups: ParallelGroups, layout: Layout,
                        timeout_s: float) -> list[dist.ProcessGroup | None]:
        """The EP group of each stage module on this rank. With two modules (DualPipe, DualPipeV)
        the second gets its own group over the same ranks, so that ``overlapped_forward_backward``
        may run one module's backward (its combine/dispatch collectives) on a second thread while
        the other's forward runs: each group then sees one sequence of collectives on every rank.
        Every rank creates every such group, in grid order (new_group is collective)."""
        if ep_group is None or len(self.ids) < 2:
            return [ep_group] * len(self.ids)
        grid = rank_grid(layout.pp, layout.dp, layout.ep)
        lists = [grid[p, e].tolist() for p in range(layout.pp) for e in range(layout.dp // layout.ep)]
        second = _own_group(lists, groups.rank, timedelta(seconds=timeout_s))
        return [ep_group, second]

    # ------------------------------------------------------------------ for the trainer
    def stage_modules(self) -> list[tuple[int, nn.Module]]:
        return list(zip(self.ids, self.stages, strict=True))

    def counts_in_norm(self) -> bool:
        """DualPipe mirror pairs hold the same parameters: only the lower rank counts them."""
        return not (self.schedule == "dualpipe" and self.g.pp_rank >= self.layout.pp // 2)

    def tied_copy(self) -> nn.Parameter | None:
        """The last stage's own embedding copy for MTP (1F1B/ZB1P), excluded from the norm."""
        if self.tie_group is None or self.g.pp_rank != self.layout.pp - 1:
            return None
        return self.stages[-1].mtp_embed.weight

    def unique_params(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters in stage order, each once (the shared MTP embedding appears in two stages)."""
        seen, out = set(), []
        for sid, m in sorted(self.stage_modules(), key=lambda t: t[0]):
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"stage{sid}.{name}", p))
        return out

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, chunks: int) -> tuple[float, dict[str, float]]:
        """One pipelined forward/backward; returns the sum of the micro-batch losses held here."""
        pp, r = self.layout.pp, self.g.pp_rank

        def criterion(*outs: torch.Tensor) -> torch.Tensor:
            return self.criterion(*outs) / chunks  # gradients: the mean over micro-batches

        if self.schedule == "dualpipev":
            args = ((tokens,), dict(criterion=criterion, labels=(targets,))) if r == 0 else ((), {})
        elif self.schedule == "dualpipe":
            half = tokens.size(0) // 2
            if r == 0:  # first half enters here; our labels are those of rank PP-1's inputs
                args = ((tokens[:half],), dict(criterion=criterion, labels=(targets[half:],)))
            elif r == pp - 1:
                args = ((tokens[half:],), dict(criterion=criterion, labels=(targets[:half],)))
            else:
                args = ((), {})
        else:
            feed = (tokens,) if r == 0 else ()
            extra = dict(criterion=criterion, labels=(targets,)) if r == pp - 1 else {}
            args = (feed, extra)
        loss, _ = self.pipe.step(*args[0], num_chunks=chunks, **args[1])
        if self.tie_group is not None and r in (0, pp - 1):
            weight = self.stages[0].embed.weight if r == 0 else self.stages[-1].mtp_embed.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=self.tie_group)
        total = float(loss.double().sum().item() * chunks) if loss is not None else 0.0
        return total, {}

    def sum_mirror_grads(self) -> None:
        """DualPipe: add the mirror rank's gradients and expert loads (it ran the other half)."""
        if self.mirror_group is None:
            return
        from dualpipe import sum_mirror_grads

        sum_mirror_grads(self.pipe)  # adds the tied MTP embedding's gradient once
        loads = [m.expert_load for _, s in sorted(self.stage_modules(), key=lambda t: t[0]) for m in s.moe_layers()]
        if loads:
            flat = torch.stack(loads)
            dist.all_reduce(flat, group=self.mirror_group)
            for buf, total in zip(loads, flat, strict=True):
                buf.copy_(total)
