"""Training-step throughput of launch/pretrain.py's trainer on the CPU: tokens/s and MFU.

For the tiny and debug presets, one process (world size 1, gloo), the same model, data and
batch: our trainer (ZeRO-1 AdamW of launch/optim.py, our loop) against the same model trained
under DeepSpeed ZeRO stage 1 (``--parallel.engine deepspeed``, no pipeline) in the same run.
MFU is against this machine's matmul peak measured in the same run (the faster of BF16 and FP32:
CPUs without AMX run BF16 matmuls far below FP32). Issue 7 sets no ratio target; the point is
that our loop adds nothing over DeepSpeed's and that the MFU is printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.config import load_config, validate
from launch.data import resolve_data
from launch.faults import StopSignal, Watchdog
from launch.mesh import build_groups
from launch.metrics import cpu_peak_flops
from launch.trainer import Trainer, resolve_model_args

CACHE = Path(os.environ.get("DSV3_BENCH_CACHE", "/tmp/dsv3-bench-cache"))
PRESETS = {
    "tiny": pytest.param(["--model.preset", "tiny", "--training.batch_size", "8", "--training.seq_len", "128"],
                         marks=pytest.mark.quick),
    "debug": ["--model.preset", "debug", "--training.batch_size", "2", "--training.seq_len", "256",
              "--training.dtype", "fp32"],
}


def _process_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _trainer(tmp: Path, argv: list[str], engine: str) -> Trainer:
    cfg = load_config(None, [*argv, "--parallel.engine", engine, "--run.dir", str(tmp / engine),
                             "--data.cache_dir", str(CACHE), "--training.steps", "1000"])
    layout = validate(cfg, 1, resolve_model_args(cfg))
    _process_group()
    shards = resolve_data(cfg.data.path, cfg.data.cache_dir, cfg.data.tokenizer, progress=False)
    groups = build_groups(1, 1, 1, "cpu", 600)
    watchdog = Watchdog(0, 1, 600, None, "bench")
    if engine == "deepspeed":
        from launch.ds_engine import DeepSpeedTrainer as cls
    else:
        cls = Trainer
    trainer = cls(cfg, layout, groups, torch.device("cpu"), shards, tmp, watchdog, StopSignal(), print)
    trainer.peak_total, _ = cpu_peak_flops(CACHE / "cpu_peak.json")
    return trainer


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
@pytest.mark.parametrize("engine", ["native", "deepspeed"])
def test_train_step(benchmark, tmp_path: Path, preset: list[str], engine: str) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    trainer = _trainer(tmp_path, preset, engine)
    name = preset[preset.index("--model.preset") + 1]
    tokens = trainer.cfg.training.batch_size * trainer.cfg.training.seq_len
    benchmark.group = f"train step {name} (batch {trainer.cfg.training.batch_size} x seq {trainer.cfg.training.seq_len}) cpu"
    benchmark.extra_info.update(role="ours" if engine == "native" else "peer", unit="FLOP",
                                work=trainer.flops_per_token * tokens)
    trainer.train_step()  # warm-up (first-call allocations)
    recs: list[dict] = []
    benchmark.pedantic(lambda: recs.append(trainer.train_step()), rounds=5, iterations=1)
    tok_s = sorted(r["tokens_per_s"] for r in recs)[len(recs) // 2]
    mfu = tok_s * trainer.flops_per_token / trainer.peak_total
    benchmark.extra_info.update(tokens_per_s=tok_s, mfu=mfu, peak_flops=trainer.peak_total)
    print(f"\n{engine:9s} {name}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.2f}% of {trainer.peak_total / 1e9:.1f} GFLOP/s")
    assert all(r["loss"] == r["loss"] for r in recs)  # finite
