"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, validated, rotated.

A checkpoint is a folder ``step_00000015`` holding DCP's files and ``done.json`` (step, layout,
the size of every file). It is written as ``step_00000015.tmp`` and renamed by rank 0 only after
every rank finished writing and ``done.json`` is on disk, so a crash mid-save leaves at worst a
``.tmp`` folder, never a damaged ``step_*``. On resume, rank 0 picks the newest folder whose
``done.json`` exists and whose files still have their recorded sizes (a folder corrupted later is
skipped in favour of the one before) and broadcasts the choice.

What goes in (all tensors, so DCP saves and loads them in place): the model's parameters and
buffers (expert biases included) keyed by global stage index (expert ones also by EP rank), each
rank's ZeRO-1 optimizer shard, the optimizer step (the schedule is a function of it), the data
position and every rank's RNG states. Resuming needs the same parallel layout; ``done.json``
records it and a mismatch is a configuration error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from launch.config import ConfigError

PREFIX = "step_"
MARKER = "done.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _file_sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != MARKER}


def is_complete(folder: Path) -> tuple[bool, str]:
    """(ok, reason): the marker exists, DCP's metadata exists, and every file has its recorded size."""
    marker = folder / MARKER
    if not marker.exists():
        return False, "no done.json (interrupted save)"
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False, "done.json unreadable"
    if not (folder / ".metadata").exists():
        return False, "DCP .metadata missing"
    sizes = _file_sizes(folder)
    for name, size in info.get("files", {}).items():
        if sizes.get(name) != size:
            return False, f"file {name} has {sizes.get(name)} bytes, expected {size}"
    return True, ""


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    out = []
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit():
                out.append((int(d.name[len(PREFIX):]), d))
    return sorted(out)


def find_latest(folder: Path, log=print) -> Path | None:
    """Newest complete checkpoint under ``folder`` (rank 0 decides, every rank gets the answer)."""
    choice: list[Any] = [None]
    if dist.get_rank() == 0:
        for _step, path in reversed(list_checkpoints(folder)):
            ok, why = is_complete(path)
            if ok:
                choice[0] = str(path)
                break
            log(f"checkpoint: ignoring {path} ({why})")
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def read_info(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def save(state: dict[str, Any], folder: Path, step: int, keep: int, layout: dict) -> Path:
    """Writes ``state`` (this rank's part) as checkpoint ``step``; keeps the newest ``keep``."""
    final = folder / checkpoint_name(step)
    tmp = folder / (checkpoint_name(step) + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))  # collective; ends with every rank's files written
    dist.barrier()
    if rank0:
        info = {"step": step, "layout": layout, "files": _file_sizes(tmp)}
        with open(tmp / MARKER, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        _prune(folder, keep)
    dist.barrier()
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _prune(folder: Path, keep: int) -> None:
    complete = [(s, p) for s, p in list_checkpoints(folder) if is_complete(p)[0]]
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for d in folder.iterdir():  # leftovers of saves that crashed
        if d.is_dir() and d.name.endswith(".tmp"):
            shutil.rmtree(d, ignore_errors=True)


def load(state: dict[str, Any], path: Path, layout: dict) -> dict:
    """Loads ``state`` in place from checkpoint ``path`` after checking the layout; returns done.json."""
    info = read_info(path)
    saved = info.get("layout", {})
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in layout.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(f"checkpoint {path} was written with another layout ({'; '.join(diffs)}); "
                          f"resume with the same parallel and model settings")
    dcp.load(state, checkpoint_id=str(path))
    return info


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
