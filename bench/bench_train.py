"""Training-step throughput of launch/pretrain.py's trainer: tokens/s and MFU.

``test_train_step``: for the tiny and debug presets, one process (world size 1, gloo), the same
model, data and batch: our trainer (ZeRO-1 AdamW of launch/optim.py, our loop) against the same
model trained under DeepSpeed ZeRO stage 1 (``--parallel.engine deepspeed``, no pipeline) in the
same run. Issue 7 sets no ratio target; the point is that our loop adds nothing over DeepSpeed's.

``test_mfu``: the MFU benchmark of issue 8 on the preset sized for this machine,
launch/configs/bench.toml (the debug shape, about a minute on 2 cores; ``--quick`` times one
step instead of all). ``test_mfu_cuda`` is its GPU counterpart, launch/configs/bench_gpu.toml
(a 1B-class MoE on one GPU, run by bench/gpu_check.sh).

MFU = flops_per_token * tokens/s / peak. The CPU peak is launch.metrics.cpu_peak_flops measured
in this run (the faster of BF16 and FP32 matmul: CPUs without AMX run BF16 far below FP32), not
read from a cache; on a GPU it is the datasheet's dense BF16 peak (launch.metrics).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.config import CONFIG_DIR, load_config, validate
from launch.data import resolve_data
from launch.faults import StopSignal, Watchdog
from launch.mesh import build_groups
from launch.metrics import cpu_peak_flops, device_peak_flops
from launch.trainer import Trainer, resolve_model_args

CACHE = Path(os.environ.get("DSV3_BENCH_CACHE", "/tmp/dsv3-bench-cache"))
PRESETS = {
    "tiny": pytest.param(["--model.preset", "tiny", "--training.batch_size", "8", "--training.seq_len", "128"],
                         marks=pytest.mark.quick),
    "debug": ["--model.preset", "debug", "--training.batch_size", "2", "--training.seq_len", "256",
              "--training.dtype", "fp32"],
}
_peak: dict[str, tuple[float, str]] = {}


def _process_group() -> None:
    if not dist.is_initialized():
        # gloo for CPU tensors (the trainer's control all-reduce), NCCL for CUDA ones
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _cpu_peak() -> tuple[float, str]:
    """This CPU's matmul peak, measured once per session (no cache file: this run's machine state)."""
    if "cpu" not in _peak:
        _peak["cpu"] = cpu_peak_flops(None)
    return _peak["cpu"]


@contextmanager
def make_trainer(tmp: Path, argv: list[str], engine: str = "native", config: Path | None = None,
                 device: str = "cpu", world: int = 1, measure_peak: bool = True) -> Iterator[Trainer]:
    """A Trainer of ``config`` (default tiny.toml) with ``argv`` overrides on the current default
    process group (``world`` data-parallel ranks), its peak FLOP/s set for MFU (NaN with
    ``measure_peak=False``, which saves the seconds of the CPU calibration). Its watchdog
    never fires (pytest-timeout bounds a benchmark) and is stopped on exit: an armed watchdog
    left behind would end the pytest process once the test is long over."""
    cfg = load_config(config, [*argv, "--parallel.engine", engine, "--run.dir", str(tmp / engine),
                               "--data.cache_dir", str(CACHE)])
    layout = validate(cfg, world, resolve_model_args(cfg))
    _process_group()
    shards = resolve_data(cfg.data.path, cfg.data.cache_dir, cfg.data.tokenizer, progress=False)
    groups = build_groups(1, world, 1, device, 600)
    watchdog = Watchdog(dist.get_rank(), world, 1e9, None, "bench")
    try:
        if engine == "deepspeed":
            from launch.ds_engine import DeepSpeedTrainer as cls
        else:
            cls = Trainer
        trainer = cls(cfg, layout, groups, torch.device(device), shards, tmp, watchdog, StopSignal(), print)
        if not measure_peak:
            trainer.peak_total = math.nan
        elif device == "cpu":
            trainer.peak_total = _cpu_peak()[0]
        else:
            trainer.peak_total = device_peak_flops(torch.device(device), None)[0]
        yield trainer
    finally:
        watchdog.stop()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
@pytest.mark.parametrize("engine", ["native", "deepspeed"])
def test_train_step(benchmark, tmp_path: Path, preset: list[str], engine: str) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    with make_trainer(tmp_path, [*preset, "--training.steps", "1000"], engine) as trainer:
        _train_step(benchmark, trainer, preset[preset.index("--model.preset") + 1], engine)


def _train_step(benchmark, trainer: Trainer, name: str, engine: str) -> None:
    tokens = trainer.cfg.training.batch_size * trainer.cfg.training.seq_len
    benchmark.group = f"train step {name} (batch {trainer.cfg.training.batch_size} x seq {trainer.cfg.training.seq_len}) cpu"
    benchmark.extra_info.update(role="ours" if engine == "native" else "peer", unit="FLOP",
                                work=trainer.flops_per_token * tokens)
    trainer.train_step()  # warm-up (first-call allocations)
    recs: list[dict] = []
    benchmark.pedantic(lambda: recs.append(trainer.train_step()), rounds=5, iterations=1)
    tok_s = _median([r["tokens_per_s"] for r in recs])
    mfu = tok_s * trainer.flops_per_token / trainer.peak_total
    benchmark.extra_info.update(tokens_per_s=tok_s, mfu=mfu, peak_flops=trainer.peak_total)
    print(f"\n{engine:9s} {name}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.2f}% of {trainer.peak_total / 1e9:.1f} GFLOP/s")
    assert all(r["loss"] == r["loss"] for r in recs)  # finite


def _mfu_run(benchmark, trainer: Trainer, config: Path, device: str, warmup: int, rounds: int) -> None:
    """Times ``rounds`` train steps after ``warmup`` and records tokens/s and MFU in extra_info."""
    t = trainer.cfg.training
    tokens = t.batch_size * t.seq_len
    benchmark.group = f"MFU {config.name} ({trainer.cfg.model.preset}-based, batch {t.batch_size} x seq {t.seq_len}, {t.dtype}) {device}"
    benchmark.extra_info.update(role="ours", unit="FLOP", work=trainer.flops_per_token * tokens, device=device,
                                config=config.name, tokens=tokens, flops_per_token=trainer.flops_per_token)
    for _ in range(warmup):
        trainer.train_step()
    recs: list[dict] = []
    benchmark.pedantic(lambda: recs.append(trainer.train_step()), rounds=rounds, iterations=1)
    tok_s = _median([r["tokens_per_s"] for r in recs])
    mfu = tok_s * trainer.flops_per_token / trainer.peak_total
    what = _cpu_peak()[1] if device == "cpu" else device_peak_flops(torch.device(device), None)[1]
    benchmark.extra_info.update(tokens_per_s=tok_s, mfu=mfu, peak_flops=trainer.peak_total, peak=what,
                                steps=rounds, loadavg=os.getloadavg()[0])
    print(f"\nMFU {config.name}: {tok_s:,.0f} tokens/s x {trainer.flops_per_token / 1e6:.1f} MFLOP/token = "
          f"{100 * mfu:.2f}% of {what}")
    assert all(r["loss"] == r["loss"] for r in recs)  # finite
    # NaN when the GPU has no datasheet peak; above 1 only by noise (the CPU peak is measured at one
    # moment of a shared machine), far above 1 means wrong FLOPs accounting
    assert math.isnan(mfu) or 0 < mfu < 1.5, f"MFU {mfu} is not plausible: check the FLOPs accounting or the peak"


@pytest.mark.quick
def test_mfu(benchmark, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = CONFIG_DIR / "bench.toml"
    with make_trainer(tmp_path, [], config=config) as trainer:
        rounds = 1 if request.config.getoption("--quick") else trainer.cfg.training.steps - 1
        _mfu_run(benchmark, trainer, config, "cpu", warmup=1, rounds=rounds)


@pytest.mark.cuda
@pytest.mark.quick
def test_mfu_cuda(benchmark, tmp_path: Path) -> None:
    config = CONFIG_DIR / "bench_gpu.toml"
    with make_trainer(tmp_path, [], config=config, device="cuda") as trainer:
        _mfu_run(benchmark, trainer, config, "cuda", warmup=2, rounds=trainer.cfg.training.steps - 2)
