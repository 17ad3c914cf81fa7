"""Pretrain a DeepSeek-V3-style model: the project's main job.

    python launch/pretrain.py                                   # tiny preset, CPU, default corpus
    python launch/pretrain.py --config launch/configs/debug.toml --training.steps 50
    torchrun --standalone --nproc-per-node=4 launch/pretrain.py --parallel.ep 2
    torchrun --nnodes=N --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
             launch/pretrain.py --config launch/configs/671b.toml --data.path /data/shards
    mpirun -n 4 python launch/pretrain.py ...                   # ranks from MPI (mpi4py)
    srun -N 2 --ntasks-per-node=8 python launch/pretrain.py ... # ranks from Slurm

Every key of the TOML config can be overridden with ``--section.key value``. Exit codes are
listed in launch/faults.py (0 done, 2 bad config/data, 3 non-finite limit, 4 peer rank failure,
5 stopped by a signal after checkpointing, 1 anything else).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from launch import faults
from launch.config import ConfigError, load_config, validate
from launch.launcher import LaunchInfo, detect_launch, init_distributed, pick_device

COLLECTIVE_ERROR_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "broken pipe",
                          "closed", "reset by", "store")


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    config = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            config = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            config = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return config, rest


def _is_collective_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    if "failed during the step:" in text:  # dualpipe relays a rank's own error to every rank
        return any(k in text for k in ("peerabort", "disterror", "distbackenderror", "distnetworkerror", "timed out"))
    return isinstance(err, RuntimeError) and any(h in text for h in COLLECTIVE_ERROR_HINTS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info: LaunchInfo | None = None
    # ---- configuration, checked before any process group exists
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
        info = detect_launch()
        from launch.trainer import resolve_model_args

        layout = validate(cfg, info.world_size, resolve_model_args(cfg))
    except ConfigError as e:
        rank = f"rank {info.rank}: " if info and info.world_size > 1 else ""
        print(f"pretrain: error: {rank}{e}", file=sys.stderr, flush=True)
        return faults.EXIT_CONFIG
    rank0 = info.rank == 0

    def log(msg: str) -> None:
        if rank0:
            print(msg, flush=True)

    stop = faults.StopSignal()
    threads = cfg.parallel.threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
    torch.set_num_threads(threads)
    device = pick_device(cfg.parallel.device, info.local_rank)
    run_dir = Path(cfg.run.dir)
    watchdog = None
    trainer = None
    try:
        # ---- data (before the process group: a bad path is exit 2 on every rank, no collective)
        from launch.data import resolve_data

        shard_dir = resolve_data(cfg.data.path, cfg.data.cache_dir, cfg.data.tokenizer, progress=rank0)
        backend = init_distributed(info, device, cfg.parallel.backend, cfg.parallel.timeout_s)
        store = (info.master_addr, info.master_port) if info.world_size > 1 else None
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "") + f"{info.master_port}"
        watchdog = faults.Watchdog(info.rank, info.world_size, cfg.parallel.timeout_s, store, run_id)
        if rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(cfg.to_toml())
            print(f"launch: {info.kind}, {info.world_size} rank(s), backend {backend}, device {device}, "
                  f"{threads} thread(s)/rank; layout pp {layout.pp} x dp {layout.dp} (ep {layout.ep}), "
                  f"{layout.micro_batches} micro-batch(es) of {layout.local_batch // layout.micro_batches} "
                  f"sequence(s) per rank; layers per stage {layout.layers_per_stage}")
            print("resolved config (saved to " + str(run_dir / "config.toml") + "):\n" + cfg.to_toml(), flush=True)
        if cfg.parallel.engine == "deepspeed":
            from launch.ds_engine import DeepSpeedTrainer as TrainerClass
        else:
            from launch.trainer import Trainer as TrainerClass
        from launch.mesh import build_groups

        groups = build_groups(layout.pp, layout.dp, layout.ep, device.type, cfg.parallel.timeout_s)
        trainer = TrainerClass(cfg, layout, groups, device, shard_dir, run_dir, watchdog, stop, log)
        code = trainer.run()
    except ConfigError as e:
        print(f"pretrain: error: rank {info.rank}: {e}", file=sys.stderr, flush=True)
        return _exit(faults.EXIT_CONFIG, watchdog)
    except Exception as e:
        from launch.trainer import TrainingStopped

        step = trainer.step + 1 if trainer is not None else 0
        if isinstance(e, TrainingStopped):
            print(f"pretrain: rank {info.rank}: {e}", file=sys.stderr, flush=True)
            return _exit(e.code, watchdog)
        if info.world_size > 1 and _is_collective_failure(e):
            who = watchdog.diagnose() if watchdog is not None else "peer status unknown"
            print(f"pretrain: rank {info.rank}: a collective failed at step {step} ({who}): "
                  f"{str(e).splitlines()[0][:300]}; exiting with code {faults.EXIT_PEER}", file=sys.stderr, flush=True)
            if info.rank == 0:  # rank 0 hosts the store: let the others read the heartbeats first
                time.sleep(faults.STORE_LINGER_S)
            return _exit(faults.EXIT_PEER, watchdog)
        traceback.print_exc()
        print(f"pretrain: rank {info.rank}: unexpected error at step {step}", file=sys.stderr, flush=True)
        return _exit(faults.EXIT_ERROR, watchdog)
    return _exit(code, watchdog, clean=True)


def _exit(code: int, watchdog: faults.Watchdog | None, clean: bool = False) -> int:
    """Ends the rank. After a failure the process group may be stuck: skip its teardown."""
    if watchdog is not None:
        watchdog.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    if clean and dist.is_initialized():
        dist.destroy_process_group()
        return code
    if dist.is_initialized():
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
