"""ZeRO-1 AdamW over flat, sharded buffers; the warmup + cosine schedule; global-norm clipping.

Why our own ZeRO-1 instead of torch's ZeroRedundancyOptimizer: expert parameters differ between
expert-parallel ranks, so they must be sharded over a different group (expert-data-parallel)
than the dense parameters (data-parallel); ZeroRedundancyOptimizer assumes one group of identical
replicas and only checkpoints through a consolidated copy on one rank. Here each group of
replicated parameters is one flat buffer cut into equal shards; a rank keeps FP32 master weights
and AdamW moments (FP32 or BF16) for its shard only, which is what DCP saves per rank.

One step, per group (dense over ``dp``, experts over ``edp``):
  1. flatten the gradients and sum them over the group (reduce-scatter on NCCL, all-reduce on gloo,
     which has no reduce-scatter), divide by the data-parallel size (the loss is a mean over DP ranks);
  2. squared norm of the own shard; one all-reduce over the world gives the global norm with every
     parameter counted once (DualPipe's mirror ranks, which hold the same stages, count one side);
  3. clip, AdamW on the shard (torch.optim.AdamW's arithmetic, decoupled weight decay);
  4. all-gather the updated shards back into the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to lr * min_ratio."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class AdamWHyper:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


def _decay_runs(params: list[torch.nn.Parameter], lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) ranges, relative to the shard [lo, hi) of the flat buffer, that hold matrices
    (ndim >= 2: weight decay applies); adjacent ranges merged."""
    runs: list[tuple[int, int]] = []
    offset = 0
    for p in params:
        a, b = max(offset, lo), min(offset + p.numel(), hi)
        if p.ndim >= 2 and a < b:
            if runs and runs[-1][1] == a - lo:
                runs[-1] = (runs[-1][0], b - lo)
            else:
                runs.append((a - lo, b - lo))
        offset += p.numel()
    return runs


class FlatShard:
    """One group of replicated parameters, flattened and sharded over ``group``."""

    def __init__(self, name: str, params: list[torch.nn.Parameter], group: dist.ProcessGroup | None,
                 grad_divisor: int, moments_dtype: torch.dtype, reduce_scatter: bool, count_in_norm: bool = True) -> None:
        self.name = name
        self.count_in_norm = count_in_norm  # False for a copy of a tied parameter held elsewhere too
        self.params = params
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.grad_divisor = grad_divisor
        self.reduce_scatter = reduce_scatter
        self.numel = sum(p.numel() for p in params)
        self.shard_len = -(-self.numel // self.size) if self.numel else 0
        self.master_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        device = params[0].device if params else torch.device("cpu")
        lo, hi = self.rank * self.shard_len, (self.rank + 1) * self.shard_len
        # The full flat buffer lives for the whole run: gradients are flattened into it, reduced in
        # it, and (size > 1) the updated shards are gathered into it. Per-step temporaries of this
        # size cost more than the arithmetic on a CPU, where glibc hands blocks this big back to
        # the OS on free and every step page-faults them in again.
        self.flat = torch.zeros(self.shard_len * self.size, dtype=self.master_dtype, device=device)
        self._copy_into_flat([p.detach() for p in params])
        self.master = self.flat[lo:hi].clone()  # FP32 (FP64 in exactness runs) master weights of the shard
        self.exp_avg = torch.zeros_like(self.master, dtype=moments_dtype if self.master_dtype != torch.float64 else torch.float64)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.decay_runs = _decay_runs(params, lo, hi)
        # reduce-scatter needs its own output; otherwise the own shard is read in place
        self.grad_shard = torch.zeros_like(self.master) if self.size > 1 and reduce_scatter else self.flat[lo:hi]
        # float64 copy of the gradient shard for the norm; kept on the CPU for the reason above
        # (CUDA's caching allocator makes the temporary cheap, and memory is dearer there)
        self._sq_scratch = torch.empty(self.shard_len, dtype=torch.float64, device=device) \
            if device.type == "cpu" and self.master_dtype != torch.float64 else None

    def _copy_into_flat(self, tensors: list[torch.Tensor | None]) -> None:
        """Writes the tensors one after the other into self.flat (None: zeros); the padding tail
        is zeroed so that it never adds to a sum or a norm."""
        offset = 0
        for p, t in zip(self.params, tensors, strict=True):
            dst = self.flat[offset:offset + p.numel()]
            if t is None:
                dst.zero_()
            else:
                dst.copy_(t.reshape(-1))
            offset += p.numel()
        self.flat[offset:].zero_()

    def reduce_grads(self) -> None:
        """Sums gradients over the group and keeps the own shard, divided by the DP size."""
        if not self.numel:
            return
        self._copy_into_flat([p.grad for p in self.params])
        if self.size > 1 and self.reduce_scatter:
            dist.reduce_scatter_tensor(self.grad_shard, self.flat, group=self.group)
        elif self.size > 1:
            dist.all_reduce(self.flat, group=self.group)  # grad_shard is a view of the own part
        if self.grad_divisor != 1:
            self.grad_shard.div_(self.grad_divisor)

    def sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of the own gradient shard, summed in float64."""
        if self._sq_scratch is None:
            g = self.grad_shard.to(torch.float64, copy=True)
        else:
            g = self._sq_scratch.copy_(self.grad_shard)
        return g.mul_(g).sum()

    @torch.no_grad()
    def step(self, hp: AdamWHyper, step: int, clip_coef: float) -> None:
        """One AdamW update of the shard (torch.optim.AdamW's arithmetic), in place: the gradient
        shard is scaled by clip_coef, and no temporary beyond the denominator is made."""
        if not self.numel:
            return
        g = self.grad_shard
        if clip_coef != 1.0:
            g.mul_(clip_coef)
        m32 = self.exp_avg.to(self.master_dtype).mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)
        v32 = self.exp_avg_sq.to(self.master_dtype).mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
        if self.exp_avg.dtype != self.master_dtype:  # BF16 moments: the FP32 working copies are rounded back
            self.exp_avg.copy_(m32)
            self.exp_avg_sq.copy_(v32)
        # decoupled weight decay on matrices only: master *= 1 - lr * wd, the factor rounded to the
        # master dtype exactly as the elementwise form (1 - lr * wd * mask) computes it
        factor = (1 - torch.tensor(hp.lr * hp.weight_decay, dtype=self.master_dtype)).item()
        for a, b in self.decay_runs:
            self.master[a:b].mul_(factor)
        bc1 = 1 - hp.beta1 ** step
        bc2 = 1 - hp.beta2 ** step
        denom = v32.sqrt().div_(math.sqrt(bc2)).add_(hp.eps)
        self.master.addcdiv_(m32, denom, value=-hp.lr / bc1)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Writes every rank's updated shard back into the (replicated) parameters."""
        if not self.numel:
            return
        if self.size > 1:
            full = self.flat  # the gradients in it are spent by now
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(full, self.master, group=self.group)
        else:
            full = self.master
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.master": self.master, f"{prefix}.exp_avg": self.exp_avg,
                f"{prefix}.exp_avg_sq": self.exp_avg_sq}


class ZeroAdamW:
    """AdamW whose state is sharded over the replicas of each parameter group (ZeRO stage 1)."""

    def __init__(self, shards: list[FlatShard], hp: AdamWHyper, norm_group: dist.ProcessGroup | None,
                 count_in_norm: bool = True) -> None:
        self.shards = shards
        self.hp = hp
        self.norm_group = norm_group  # all ranks: each owns distinct shards (or none, see count_in_norm)
        self.count_in_norm = count_in_norm  # False on the second rank of a DualPipe mirror pair
        self.step_count = 0

    def reduce_grads(self) -> None:
        for s in self.shards:
            s.reduce_grads()

    def global_grad_norm(self) -> float:
        """The L2 norm of the full gradient, every parameter counted once."""
        device = self.shards[0].master.device if self.shards else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=device)
        if self.count_in_norm:
            for s in self.shards:
                if s.count_in_norm:
                    sq += s.sq_norm()
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(sq, group=self.norm_group)
        return math.sqrt(sq.item())

    def step(self, lr: float, clip_coef: float) -> None:
        self.step_count += 1
        self.hp.lr = lr
        for s in self.shards:
            s.step(self.hp, self.step_count, clip_coef)
        for s in self.shards:
            s.gather_params()

    def state_dict(self, prefixes: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"optim.step": torch.tensor(self.step_count)}
        for s, prefix in zip(self.shards, prefixes, strict=True):
            out.update(s.state_dict(prefix))
        return out

    def load_step(self, state: dict[str, torch.Tensor]) -> None:
        """The tensors are loaded in place by DCP; only the step counter needs copying back."""
        self.step_count = int(state["optim.step"])

    @torch.no_grad()
    def push_master_to_params(self) -> None:
        """After loading a checkpoint: the parameters take the loaded master weights."""
        for s in self.shards:
            s.gather_params()


def clip_coefficient(norm: float, max_norm: float) -> float:
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
