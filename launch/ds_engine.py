"""``--parallel.engine deepspeed``: the same model, data and loop under deepspeed.initialize.

For runs without pipeline or expert parallel, as a comparison point (bench/bench_train.py) and
for users who prefer DeepSpeed's ZeRO stage 1 or 2. On a CPU it needs ``DS_ACCELERATOR=cpu``
(set here before deepspeed is imported) and uses the gloo process group the trainer created.
The optimizer is torch's AdamW handed to DeepSpeed (no DeepSpeed op has to be compiled); clipping,
gradient accumulation over the micro-batches and ZeRO sharding are DeepSpeed's. Checkpoints are
DeepSpeed's own (``engine.save_checkpoint``); resuming them is not wired up here.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

from launch.config import ConfigError
from launch.trainer import Trainer


class DeepSpeedTrainer(Trainer):
    def _build_optimizer(self, named: list[tuple[str, nn.Parameter]], tied: nn.Parameter | None) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: pip install deepspeed") from None
        if self.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes, once per
            # machine) on first use; we run it on our gloo process group like our own engine.
            import deepspeed.comm.torch

            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        # DeepSpeed reads these even with a process group already created (mpirun/Slurm/single)
        os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0))
        os.environ.setdefault("RANK", str(self.g.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.g.world))
        if self.cfg.checkpoint.resume != "none":
            raise ConfigError("checkpoint.resume is not supported with parallel.engine=deepspeed")
        t = self.cfg.training
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        optim = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        chunks = self.layout.micro_batches
        ds_config = {
            "train_micro_batch_size_per_gpu": self.layout.local_batch // chunks,
            "gradient_accumulation_steps": chunks,
            "train_batch_size": t.batch_size,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": self.cfg.parallel.zero_stage},
            "bf16": {"enabled": t.dtype == "bf16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.ds_optim, _, _ = deepspeed.initialize(model=self.model, optimizer=optim, config=ds_config,
                                                                dist_init_required=False)
        self.optim = None

    def forward_backward(self) -> tuple[float, dict[str, float]]:
        batch = self.loader.next_batch()
        tokens, targets = batch.tokens.to(self.device), batch.targets.to(self.device)
        chunks = self.layout.micro_batches
        total, metrics = 0.0, {}
        for tok, tgt in zip(tokens.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
            loss, metrics = self.engine.module.compute_loss(tok, tgt)
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            if self.engine.is_gradient_accumulation_boundary():
                break
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
            total += loss.item()
        return total + loss.item(), metrics

    def _apply_update(self, step: int, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.watchdog.progress(step, "deepspeed step")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def state(self):  # checkpoints go through DeepSpeed
        raise NotImplementedError

    def save(self):
        self.watchdog.progress(self.step, "checkpoint save")
        self.engine.save_checkpoint(str(self.ckpt_dir / "deepspeed"), tag=f"step_{self.step:08d}")
        if self.rank0:
            self.log(f"checkpoint: DeepSpeed checkpoint of step {self.step} in {self.ckpt_dir / 'deepspeed'}")
        return self.ckpt_dir / "deepspeed"
