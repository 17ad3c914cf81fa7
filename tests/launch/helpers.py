"""Launching the real trainer in subprocesses (torchrun, plain env:// ranks, mpirun) for the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"

# A smaller tiny model and batch so a 30-step run takes seconds on 2 shared cores.
SMALL = ["--model.dim", "64", "--model.n_layers", "2", "--model.inter_dim", "128", "--model.moe_inter_dim", "32",
         "--model.q_lora_rank", "32", "--model.kv_lora_rank", "32", "--model.qk_nope_head_dim", "16",
         "--model.qk_rope_head_dim", "8", "--model.v_head_dim", "16", "--model.n_heads", "2",
         "--training.seq_len", "32", "--training.batch_size", "4", "--training.warmup_steps", "5",
         "--run.tensorboard", "false", "--run.plot", "false", "--checkpoint.hf_export", "false"]


def base_args(tmp: Path, steps: int, cache: Path | None = None) -> list[str]:
    """SMALL plus a run folder in ``tmp`` and a shared corpus cache."""
    cache = cache or Path(os.environ.get("DSV3_TEST_CACHE", "/tmp/dsv3-test-cache"))
    return [*SMALL, "--training.steps", str(steps), "--run.dir", str(tmp / "run"), "--data.cache_dir", str(cache),
            "--run.calibration_cache", str(cache / "cpu_peak.json"), "--checkpoint.interval", "0"]


def env_for(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        env.pop(k, None)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def single_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
              "PMIX_RANK", "SLURM_PROCID"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_ranks(args: list[str], world: int, cwd: Path) -> list[subprocess.Popen]:
    """``world`` pretrain processes rendezvousing over env:// (what torchrun sets, without its agent)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, str(PRETRAIN), *args], env=env_for(r, world, port), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def run_single(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PRETRAIN), *args], env=single_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(path: Path) -> dict:
    """A DCP checkpoint folder as {key: tensor}, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=True)
