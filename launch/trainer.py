"""The training loop: build, resume, step, log, checkpoint, stop.

One step on every rank:
  1. forward + backward over the micro-batches (``1/micro_batches`` scaled, so gradients are the
     mean over the rank's sequences), through the pipeline schedule when pp > 1;
  2. one small all-reduce over the world carries [loss, non-finite flag, stop flag]: every rank
     learns the global loss, whether to skip the step, and whether any rank got SIGTERM/SIGINT;
  3. gradients reduced in their groups and the ZeRO-1 AdamW step (launch/optim.py) with the
     global-norm clip and the warmup + cosine learning rate;
  4. the aux-loss-free expert-bias update with the step's loads summed over data parallel;
  5. rank 0 logs; a checkpoint every ``checkpoint.interval`` steps and when stopping.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch import checkpoint as ckpt
from launch.config import Config, ConfigError, Layout
from launch.data import PackedLoader, TokenShards
from launch.faults import EXIT_NONFINITE, EXIT_SIGNAL, StopSignal, Watchdog
from launch.mesh import ParallelGroups
from launch.metrics import RunLogger, device_peak_flops, memory_gib, plot_loss
from launch.optim import AdamWHyper, FlatShard, ZeroAdamW, clip_coefficient, lr_at

FULL_INIT_MAX_BYTES = 8 * 2**30
TRAINING_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


class TrainingStopped(Exception):
    """Raised to end the run with an exit code (after whatever saving applies)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_expert_param(name: str) -> bool:
    """Routed-expert tensors (sharded over EP); shared experts and the router are replicated."""
    return ".experts." in f".{name}"


def model_package(cfg: Config):
    try:
        return importlib.import_module(cfg.model.module)
    except ImportError as e:
        raise ConfigError(f"model.module: cannot import {cfg.model.module!r} ({e})") from None


def resolve_model_args(cfg: Config) -> Any:
    """ModelArgs of the preset with the [model] overrides and training.dtype; errors -> ConfigError."""
    pkg = model_package(cfg)
    fields = dict(cfg.model.fields)
    dtype = TRAINING_DTYPES.get(cfg.training.dtype)
    if "dtype" in fields and dtype is not None and fields["dtype"] != dtype:
        raise ConfigError(f"model.dtype={fields['dtype']!r} contradicts training.dtype={cfg.training.dtype!r}")
    if dtype is not None:
        fields["dtype"] = dtype
    try:
        return pkg.ModelArgs.preset(cfg.model.preset, **fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, groups: ParallelGroups, device: torch.device,
                 shard_dir: Path, run_dir: Path, watchdog: Watchdog, stop: StopSignal, log) -> None:
        self.cfg, self.layout, self.g, self.device = cfg, layout, groups, device
        self.run_dir, self.watchdog, self.stop, self.log = run_dir, watchdog, stop, log
        self.rank0 = groups.rank == 0
        self.pkg = model_package(cfg)
        self.args = resolve_model_args(cfg)
        t = cfg.training

        full_state = self._full_initial_state()
        ep_group = groups.ep_group if groups.ep > 1 else None
        if layout.pp > 1:
            from launch.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self.pkg, self.args, cfg, layout, groups, ep_group, device, full_state)
            self.modules: list[tuple[int, nn.Module]] = self.pipeline.stage_modules()
            self.model = None
            named = self.pipeline.unique_params()
            tied = self.pipeline.tied_copy()
        else:
            self.pipeline = None
            self.model = self.pkg.Transformer(self.args, ep_group=ep_group)
            if full_state is not None and ep_group is not None:
                from model.ep import shard_state_dict

                self.model.load_state_dict(shard_state_dict(full_state, self.model))
            self.model.to(device)
            self.modules = [(0, self.model)]
            named = list(self.model.named_parameters())
            tied = None
        torch.manual_seed(t.seed + 1 + groups.rank)  # per-rank stream for anything random later

        self._build_optimizer(named, tied)

        self.loader = PackedLoader(TokenShards(shard_dir), t.seq_len, t.batch_size, groups.dp_rank, layout.dp, t.seed)
        vocab = self.loader.shards.vocab_size
        if vocab > self.args.vocab_size:
            raise ConfigError(f"the data's tokenizer has {vocab} tokens, more than model.vocab_size={self.args.vocab_size}")
        self.step = 0
        self.nan_skips = 0
        self.ckpt_dir = Path(cfg.checkpoint.folder) if cfg.checkpoint.folder else run_dir / "checkpoints"
        self.flops_per_token = float(self.pkg.flops_per_token(self.args, t.seq_len))

    def _build_optimizer(self, named: list[tuple[str, nn.Parameter]], tied: nn.Parameter | None) -> None:
        """ZeRO-1 AdamW: dense parameters sharded over DP, routed experts over expert-DP."""
        t, groups, layout = self.cfg.training, self.g, self.layout
        moments = torch.bfloat16 if t.moments_dtype == "bf16" else torch.float32
        dense, expert, copies = [], [], []
        for name, p in named:
            if p.requires_grad:
                (copies if p is tied else expert if is_expert_param(name) else dense).append(p)
        reduce_scatter = dist.get_backend() == "nccl"
        self.shards = [FlatShard("dense", dense, groups.dp_group, layout.dp, moments, reduce_scatter),
                       FlatShard("experts", expert, groups.edp_group, layout.dp, moments, reduce_scatter),
                       FlatShard("tied", copies, groups.dp_group, layout.dp, moments, reduce_scatter,
                                 count_in_norm=False)]
        self.optim_prefixes = [f"optim.pp{groups.pp_rank}.dense.shard{groups.dp_rank}",
                               f"optim.pp{groups.pp_rank}.ep{groups.ep_rank}.experts.shard{groups.edp_rank}",
                               f"optim.pp{groups.pp_rank}.tied.shard{groups.dp_rank}"]
        count = self.pipeline.counts_in_norm() if self.pipeline else True
        self.optim = ZeroAdamW(self.shards, AdamWHyper(t.lr, t.beta1, t.beta2, t.eps, t.weight_decay),
                               norm_group=dist.group.WORLD, count_in_norm=count)

    def _full_initial_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's initial weights from ``training.seed``, built once on the CPU, so that
        every parallel layout starts from the same weights (each rank keeps its stages and expert
        rows). Skipped for models too big for host memory (then each rank initialises its part)."""
        total, _ = self.pkg.count_params(self.args)
        if self.layout.pp == 1 and self.layout.ep == 1:
            torch.manual_seed(self.cfg.training.seed)
            return None  # the model built next is the whole model: same stream, same weights
        if total * self.args.torch_dtype.itemsize > FULL_INIT_MAX_BYTES:
            torch.manual_seed(self.cfg.training.seed)
            return None
        torch.manual_seed(self.cfg.training.seed)
        state = self.pkg.Transformer(self.args).state_dict()
        torch.manual_seed(self.cfg.training.seed)
        return state

    # ------------------------------------------------------------------ checkpoint state
    def layout_info(self) -> dict:
        return {"pp": self.layout.pp, "dp": self.layout.dp, "ep": self.layout.ep,
                "schedule": self.cfg.parallel.schedule if self.layout.pp > 1 else "none",
                "model": json.dumps(dataclasses.asdict(self.args), sort_keys=True, default=str),
                "moments_dtype": self.cfg.training.moments_dtype}

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = {}
        for stage, m in self.modules:
            for name, t in m.state_dict().items():
                ep = f"ep{self.g.ep_rank}." if is_expert_param(name) else ""
                st[f"model.stage{stage}.{ep}{name}"] = t
        st.update(self.optim.state_dict(self.optim_prefixes))
        st["train.step"] = torch.tensor(self.step)
        st["train.nan_skips"] = torch.tensor(self.nan_skips)
        ld = self.loader.state_dict()
        st["data.position"] = torch.tensor([ld["consumed"], ld["seq_len"], ld["global_batch"]])
        for k, v in ckpt.rng_state().items():
            st[f"rng.rank{self.g.rank}.{k}"] = v
        return st

    def save(self) -> Path:
        self.watchdog.progress(self.step, "checkpoint save")
        path = ckpt.save(self.state(), self.ckpt_dir, self.step, self.cfg.checkpoint.keep, self.layout_info())
        if self.rank0:
            self.log(f"checkpoint: saved step {self.step} to {path}")
        return path

    def maybe_resume(self) -> None:
        how = self.cfg.checkpoint.resume
        if how == "none":
            return
        if how == "auto":
            path = ckpt.find_latest(self.ckpt_dir, log=self.log if self.rank0 else lambda _m: None)
            if path is None:
                if self.rank0:
                    self.log(f"checkpoint: nothing to resume in {self.ckpt_dir}; starting from step 0")
                return
        else:
            path = Path(how)
            ok, why = ckpt.is_complete(path) if path.is_dir() else (False, "not a folder")
            if not ok:
                raise ConfigError(f"checkpoint.resume={how!r} is not a complete checkpoint ({why})")
        self.watchdog.progress(0, "checkpoint load")
        state = self.state()
        ckpt.load(state, path, self.layout_info())
        self.step = int(state["train.step"])
        self.nan_skips = int(state["train.nan_skips"])
        self.optim.load_step(state)
        self.optim.push_master_to_params()
        pos = state["data.position"].tolist()
        self.loader.load_state_dict({"consumed": pos[0], "seq_len": pos[1], "global_batch": pos[2]})
        ckpt.set_rng_state({k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith(f"rng.rank{self.g.rank}.")})
        if self.rank0:
            self.log(f"checkpoint: resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ one step
    def _inject_faults(self, step: int) -> None:
        f = self.cfg.faults
        if self.g.rank != f.rank:
            return
        if step == f.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == f.sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == f.hang_at_step:
            while True:
                time.sleep(3600)

    def forward_backward(self) -> tuple[float, dict[str, float]]:
        """This rank's summed micro-batch losses (0 where it holds none) and the model's metrics."""
        batch = self.loader.next_batch()
        tokens, targets = batch.tokens.to(self.device), batch.targets.to(self.device)
        chunks = self.layout.micro_batches
        if self.pipeline is not None:
            return self.pipeline.step(tokens, targets, chunks)
        total = 0.0
        metrics: dict[str, float] = {}
        for tok, tgt in zip(tokens.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
            loss, metrics = self.model.compute_loss(tok, tgt)
            if self.step + 1 == self.cfg.faults.nan_at_step and self.g.rank == self.cfg.faults.rank:
                loss = loss * float("nan")
            (loss / chunks).backward()
            total += loss.item()
        return total, metrics

    def _apply_update(self, step: int, lr: float) -> float:
        """Reduces gradients, clips by the global norm, steps ZeRO-1 AdamW; returns the norm
        (non-finite: nothing was applied)."""
        self.watchdog.progress(step, "gradient reduction")
        if self.pipeline is not None:
            self.pipeline.sum_mirror_grads()
        self.optim.reduce_grads()
        grad_norm = self.optim.global_grad_norm()
        if math.isfinite(grad_norm):
            self.watchdog.progress(step, "optimizer")
            self.optim.step(lr, clip_coefficient(grad_norm, self.cfg.training.grad_clip))
        return grad_norm

    def moe_modules(self) -> list[nn.Module]:
        return [m for _, m in self.modules if hasattr(m, "update_expert_bias")]

    def train_step(self) -> dict[str, Any]:
        step = self.step + 1
        self._inject_faults(step)
        self.watchdog.progress(step, "forward/backward")
        t0 = time.perf_counter()
        local_loss, metrics = self.forward_backward()
        load = [layer.expert_load.clone() for m in self.moe_modules() for layer in m.moe_layers()]

        self.watchdog.progress(step, "loss all-reduce")
        finite = math.isfinite(local_loss)
        ctrl = torch.tensor([local_loss / (self.layout.micro_batches * self.layout.dp) if finite else 0.0,
                             0.0 if finite else 1.0, 1.0 if self.stop.received else 0.0], dtype=torch.float64,
                            device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(ctrl)
        loss, nonfinite, stop = ctrl.tolist()

        lr = lr_at(step - self.nan_skips, self.cfg.training.lr, self.cfg.training.warmup_steps,
                   self.cfg.training.steps, self.cfg.training.min_lr_ratio)
        grad_norm = math.nan
        skipped = nonfinite > 0
        if not skipped:
            grad_norm = self._apply_update(step, lr)
            skipped = not math.isfinite(grad_norm)
        if skipped:
            self.nan_skips += 1
            for m in self.moe_modules():  # this step's routing counts must not move the biases
                for layer in m.moe_layers():
                    layer.take_expert_load()
            if self.nan_skips > self.cfg.training.max_nan_skips:
                raise TrainingStopped(EXIT_NONFINITE, f"step {step}: non-finite loss or gradient for the "
                                      f"{self.nan_skips}th time (training.max_nan_skips="
                                      f"{self.cfg.training.max_nan_skips}); stopping")
        else:
            for m in self.moe_modules():
                m.update_expert_bias(group=self.g.dp_group if self.layout.dp > 1 else None)
        for _, m in self.modules:
            m.zero_grad(set_to_none=True)
        self.step = step
        dt = time.perf_counter() - t0

        tokens = self.cfg.training.batch_size * self.cfg.training.seq_len
        rec: dict[str, Any] = {"step": step, "loss": loss if not nonfinite else math.nan, "lr": lr,
                               "grad_norm": grad_norm, "step_time_s": dt, "tokens_per_s": tokens / dt,
                               "skipped": bool(skipped), "stop": bool(stop > 0)}
        rec["mfu"] = self.flops_per_token * rec["tokens_per_s"] / self.peak_total
        for k in ("main_loss", "mtp_loss", "balance_loss"):
            if k in metrics:
                rec[k] = metrics[k]
        if load and load[0].numel():
            counts = torch.stack(load).double()
            counts = counts[counts.sum(1) > 0]
            if counts.numel():
                rec["expert_load_max_mean"] = float((counts.max(1).values / counts.mean(1)).max())
        rec["mem_gib"] = memory_gib(self.device)
        return rec

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        cfg = self.cfg
        if self.device.type == "cpu":  # the machine's peak, measured with every core of one node
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)
            peak, what = device_peak_flops(self.device, cfg.run.calibration_cache)
            torch.set_num_threads(threads)
            nodes = max(1, self.layout.world // int(os.environ.get("LOCAL_WORLD_SIZE", self.layout.world)))
            self.peak_total = peak * nodes
        else:
            peak, what = device_peak_flops(self.device, None)
            self.peak_total = peak * self.layout.world
        if self.rank0:
            self.log(f"MFU peak: {what}; FLOPs/token {self.flops_per_token:.4g} "
                     f"(6 x active non-embedding params incl. head and MTP + attention at seq {cfg.training.seq_len}, "
                     f"no causal discount)")
        self.maybe_resume()
        logger = RunLogger(self.run_dir, cfg.training.steps, self.step, cfg.run.log_interval, cfg.run.tensorboard,
                           cfg.run.progress_bar) if self.rank0 else None
        mfus: list[float] = []
        code = 0
        try:
            while self.step < cfg.training.steps:
                rec = self.train_step()
                mfus.append(rec["mfu"])
                if logger is not None:
                    logger.log(rec)
                if rec["stop"]:
                    if self.rank0:
                        self.log(f"received a stop signal: saving a checkpoint at step {self.step} and exiting "
                                 f"(exit code {EXIT_SIGNAL}; resume with --checkpoint.resume auto)")
                    self.save()
                    code = EXIT_SIGNAL
                    break
                interval = cfg.checkpoint.interval
                if interval and self.step % interval == 0 and self.step < cfg.training.steps:
                    self.save()
            else:
                if cfg.checkpoint.at_end:
                    self.save()
                self.export_hf()
        finally:
            if logger is not None:
                logger.close()
        if self.rank0 and mfus:
            tail = sorted(mfus[len(mfus) // 4:]) or sorted(mfus)
            self.log(f"done: step {self.step}, median MFU {100 * tail[len(tail) // 2]:.2f}% ({what})")
            if cfg.run.plot and plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png"):
                self.log(f"loss curve: {self.run_dir / 'loss.png'}")
        return code

    def export_hf(self) -> None:
        if not self.cfg.checkpoint.hf_export:
            return
        save = getattr(self.pkg, "save_hf_checkpoint", None)
        if save is None:
            try:
                save = importlib.import_module(f"{self.cfg.model.module}.hf").save_hf_checkpoint
            except (ImportError, AttributeError):
                save = None
        if save is None or self.model is None or self.layout.ep > 1:  # decided alike on every rank
            if self.rank0:
                why = "the model package has no save_hf_checkpoint" if save is None else \
                    "it needs the whole model in one process (pp = ep = 1)"
                self.log(f"HF export skipped: {why}")
            return
        if self.rank0:
            out = self.run_dir / "hf"
            self.watchdog.progress(self.step, "HF export")
            save(self.model, str(out))
            self.log(f"HF checkpoint: {out}")
        dist.barrier()
