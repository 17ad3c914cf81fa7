"""Who am I and where is rank 0: torchrun, mpirun (mpi4py), Slurm (srun) or a plain process.

Every launcher ends the same way: ``init_process_group`` over TCP to rank 0's address with the
configured collective timeout, gloo on CPUs and nccl on GPUs.

- torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (c10d rendezvous,
  any number of nodes): used as they are.
- mpirun: rank and size come from ``MPI.COMM_WORLD``; rank 0 picks a free port on its host and
  broadcasts ``(address, port)`` over MPI, so no environment needs to be set by hand.
- Slurm (srun): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; rank 0's address is MASTER_ADDR or
  the first host of SLURM_JOB_NODELIST, the port MASTER_PORT or one derived from the job id.
- nothing: one process, world size 1.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass
class LaunchInfo:
    kind: str  # torchrun, mpi, slurm or single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def detect_launch(env: dict[str, str] | None = None) -> LaunchInfo:
    """Reads the launcher's variables; for MPI, exchanges rank 0's address over MPI."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchInfo("torchrun", int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                          int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                          int(env.get("MASTER_PORT", 29500)))
    if any(v in env for v in MPI_RANK_VARS):
        return _mpi_launch(env)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return _slurm_launch(env)
    return LaunchInfo("single", 0, 1, 0, 1, "127.0.0.1", 0)


def _mpi_launch(env: dict[str, str]) -> LaunchInfo:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("started under MPI but mpi4py is not installed: pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    addr = env.get("MASTER_ADDR") or (_routable_address() if size > 1 else "127.0.0.1")
    port = int(env.get("MASTER_PORT", 0)) or free_port()
    addr, port = comm.bcast((addr, port) if rank == 0 else None, root=0)
    return LaunchInfo("mpi", rank, size, local.Get_rank(), local.Get_size(), addr, port)


def _routable_address() -> str:
    """This host's address as other hosts see it (the loopback when that is all there is)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise RuntimeError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_launch(env: dict[str, str]) -> LaunchInfo:
    rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    port = int(env.get("MASTER_PORT", 0)) or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or world
    return LaunchInfo("slurm", rank, world, int(env.get("SLURM_LOCALID", 0)), local_world, addr, port)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(info: LaunchInfo, device: torch.device, backend: str, timeout_s: float) -> str:
    """Creates the default process group (even for one process, so every code path is the same)."""
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if info.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif info.kind == "torchrun":  # the agent hosts the store at MASTER_ADDR:MASTER_PORT
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                                rank=info.rank, world_size=info.world_size, timeout=timeout)
    return backend
