"""Buffer.dispatch / combine on a one-rank group of each backend, against the float64 reference
(tests/comm/reference.py): gloo with CPU tensors, and NCCL with CUDA tensors when a GPU is lent.

Why one rank: it is the only NCCL group a single GPU can hold (NCCL refuses two ranks on one
device), and it still runs the whole NCCL path of comm (CUDA count and header tensors, the CUDA
pack/unpack/reduce kernels, stream events, the guarded exchanges) through real NCCL calls. Each
backend runs in a child process, so its default process group cannot leak into other tests.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


def check_case(buf, case, device: str, async_finish: bool) -> None:
    """BF16 dispatch (rows, local top-k, counts exact), combine (FP32 sums), FP8 dispatch (bytes
    exact), dispatch with the handle, all on `device` tensors of the one-rank group."""
    import ops
    from tests.comm.reference import equal_bytes, make_topk, make_x, make_z, reference_combine, reference_dispatch

    idx, w = (t.to(device) for t in make_topk(case, 0))
    x = make_x(case, 0).to(device)
    ref = reference_dispatch(case, 0, lambda s, rows: [make_x(case, s, rows=rows)])

    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_experts=case.num_experts, expert_alignment=case.alignment,
        async_finish=async_finish)
    event.current_stream_wait()
    assert recv_x.device.type == device and equal_bytes(recv_x, ref.rows[0]), f"recv_x ({case})"
    assert torch.equal(recv_idx.cpu(), ref.topk_idx) and equal_bytes(recv_w, ref.topk_weights)
    assert counts == ref.per_expert, f"counts {counts} vs {ref.per_expert}"

    z = make_z(case, 0, torch.arange(recv_x.shape[0])).to(device)
    combined, combined_w, event = buf.combine(z, handle, topk_weights=recv_w, async_finish=async_finish)
    event.current_stream_wait()
    want = reference_combine(case, 0, lambda d, rows: make_z(case, d, rows))
    assert ops.calc_diff(combined.cpu(), want) < 5e-6, f"combine ({case})"
    assert torch.equal(combined_w.cpu(), torch.where(idx >= 0, w, 0.0).cpu())

    q, sf = ops.per_token_cast_to_fp8(x)
    (rq, rsf), *_, event = buf.dispatch((q, sf), topk_idx=idx, topk_weights=w, num_experts=case.num_experts,
                                        async_finish=async_finish)
    event.current_stream_wait()
    ref_q, ref_sf = ops.per_token_cast_to_fp8(ref.rows[0])
    assert equal_bytes(rq, ref_q) and equal_bytes(rsf, ref_sf), f"FP8 payload ({case})"

    rx2, *_, event = buf.dispatch(x.float() * 3, handle=handle, async_finish=async_finish)
    event.current_stream_wait()
    assert equal_bytes(rx2, ref.rows[0].float() * 3), f"dispatch with a handle ({case})"


def check_cases(device: str, seed: int) -> int:
    """Random cases on the one-rank default group (already initialised); returns how many ran."""
    from comm import all_to_all
    from tests.comm.reference import Case

    rng = random.Random(seed)
    buf = all_to_all.Buffer()
    cases = [Case(seed + i, (rng.choice([0, 1, rng.randint(2, 400)]),), rng.choice([1, 100, 7168]), rng.randint(1, 9),
                  rng.randint(1, 32), rng.choice([1, 128])) for i in range(6)]
    for i, case in enumerate(cases):
        check_case(buf, case, device, async_finish=i % 2 == 1)
    return len(cases)


def child(backend: str, port: int, seed: int) -> None:
    """Entry point of the child process: a one-rank group of `backend`, then the cases."""
    import torch.distributed as dist

    device = "cuda" if backend == "nccl" else "cpu"
    kwargs = {}
    if device == "cuda":
        torch.cuda.set_device(0)
        kwargs["device_id"] = torch.device("cuda", 0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    try:
        print("cases passed:", check_cases(device, seed))
    finally:
        dist.destroy_process_group()


def _run_child(backend: str) -> None:
    seed = random.randrange(1 << 30)
    code = f"from tests.comm.test_one_rank_backends import child; child({backend!r}, {free_port()}, {seed})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=100)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{backend} child did not finish in 100 s (seed {seed}):\n{str(err.stdout)[-2000:]}")
    assert proc.returncode == 0, f"{backend} child failed (seed {seed}):\n{(proc.stdout + proc.stderr)[-4000:]}"


def test_one_rank_gloo_group_on_cpu() -> None:
    _run_child("gloo")


@pytest.mark.cuda
def test_one_rank_nccl_group_on_cuda() -> None:
    _run_child("nccl")
