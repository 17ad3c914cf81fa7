"""launch/pretrain.py end to end, in real processes: training, equality with one process, resume,
faults, launchers and exit codes."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch.helpers import (
    PRETRAIN,
    REPO,
    base_args,
    checkpoint_tensors,
    metrics,
    run_single,
    single_env,
    start_ranks,
    wait_all,
)


def _ok(res: tuple[int, str, str] | subprocess.CompletedProcess) -> None:
    code, out, err = (res.returncode, res.stdout, res.stderr) if hasattr(res, "returncode") else res
    assert code == 0, f"exit {code}\nstdout tail:\n{out[-2000:]}\nstderr tail:\n{err[-4000:]}"


# dualpipev over 2 pipeline ranks needs 4 stages: 4 layers; 8 sequences = 2 DP ranks x 4 micro-batches.
PP_ARGS = ["--model.n_layers", "4", "--training.batch_size", "8"]


def test_pp2_dp2_ep2_torchrun_loss_falls(tmp_path: Path) -> None:
    """torchrun, 4 gloo ranks: pipeline 2 (DualPipeV) x data parallel 2 with expert parallel 2,
    30 steps of the (smaller) tiny preset: the loss falls and MFU is reported."""
    args = [*base_args(tmp_path, 30), *PP_ARGS, "--parallel.pp", "2", "--parallel.ep", "2", "--training.lr", "3e-3",
            "--checkpoint.hf_export", "true"]  # skipped with pp > 1, alike on every rank
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          str(PRETRAIN), *args], env={**single_env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    _ok(res)
    assert "launch: torchrun, 4 rank(s)" in res.stdout and "layout pp 2 x dp 2 (ep 2)" in res.stdout
    recs = metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 31))
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert all(0 < r["mfu"] < 1 for r in recs) and "median MFU" in res.stdout
    assert "HF export skipped" in res.stdout


def _layout_losses(tmp: Path, name: str, steps: int, common: list[str], extra: list[str], world: int) -> list[float]:
    if world == 1:
        _ok(run_single([*base_args(tmp / name, steps), *common, *extra], cwd=tmp))
    else:
        for res in wait_all(start_ranks([*base_args(tmp / name, steps), *common, *extra], world, tmp), timeout=600):
            _ok(res)
    recs = metrics(tmp / name / "run")
    assert len(recs) == steps
    return [r["loss"] for r in recs]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# The seq-wise balance loss rides on the activations in a pipeline and is not part of its loss
# value (model/pipeline.py), so these comparisons switch it off (seq_aux_alpha 0).
EXACT = ["--training.dtype", "fp64", "--model.seq_aux_alpha", "0", *PP_ARGS]


def test_float64_losses_equal_single_process(tmp_path: Path) -> None:
    """float64, FP8 off: DP 2, PP 2 (DualPipeV) x DP 2, and PP 2 x DP 2 x EP 2 give the per-step losses of one
    process on the same model and data to a relative 1e-9 at each of 30 steps."""
    steps = 30
    ref = _layout_losses(tmp_path, "one", steps, EXACT, [], 1)
    assert _max_rel(_layout_losses(tmp_path, "dp2", steps, EXACT, [], 2), ref) < 1e-9
    assert _max_rel(_layout_losses(tmp_path, "pp2dp2", steps, EXACT, ["--parallel.pp", "2"], 4), ref) < 1e-9
    ep = ["--parallel.pp", "2", "--parallel.ep", "2"]  # DualPipeV's two stage modules overlap on two EP groups
    assert _max_rel(_layout_losses(tmp_path, "pp2dp2ep2", steps, EXACT, ep, 4), ref) < 1e-9
    assert ref[-1] < ref[0]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b", "zb1p"])
def test_float64_other_schedules_equal_single_process(tmp_path: Path, schedule: str) -> None:
    """DualPipe (mirror gradients summed), 1F1B and ZB1P (MTP's tied embedding copy) over 2
    pipeline ranks: per-step losses equal one process to a relative 1e-9."""
    steps = 12
    ref = _layout_losses(tmp_path, "one", steps, EXACT, [], 1)
    got = _layout_losses(tmp_path, schedule, steps, EXACT, ["--parallel.pp", "2", "--parallel.schedule", schedule], 2)
    assert _max_rel(got, ref) < 1e-9


def test_resume_after_sigterm_is_bit_exact_and_skips_corrupted(tmp_path: Path) -> None:
    """SIGTERM on rank 1 at step 15 -> every rank saves and exits 5; resuming reaches step 30
    with parameters, optimizer state and losses bit-identical to an uninterrupted run. A newer
    checkpoint folder damaged after writing is ignored in favour of the last good one."""
    world, steps = 2, 30
    full = start_ranks([*base_args(tmp_path / "full", steps)], world, tmp_path)
    for res in wait_all(full, timeout=400):
        _ok(res)

    part = tmp_path / "part"
    args = base_args(part, steps)
    procs = start_ranks([*args, "--faults.sigterm_at_step", "15", "--faults.rank", "1"], world, tmp_path)
    results = wait_all(procs, timeout=400)
    assert [r[0] for r in results] == [5, 5], results[0][2][-2000:]
    ckdir = part / "run" / "checkpoints"
    assert (ckdir / "step_00000015" / "done.json").exists()
    # A "newer" checkpoint whose file got truncated after the save: resume must skip it.
    bad = ckdir / "step_00000016"
    shutil.copytree(ckdir / "step_00000015", bad)
    victim = next(f for f in sorted(bad.iterdir()) if f.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # and a save that crashed before its rename
    shutil.copytree(ckdir / "step_00000015", ckdir / "step_00000017.tmp")

    procs = start_ranks([*args, "--checkpoint.resume", "auto"], world, tmp_path)
    results = wait_all(procs, timeout=400)
    for res in results:
        _ok(res)
    assert "ignoring" in results[0][1] and "step_00000016" in results[0][1]
    assert "resumed from" in results[0][1] and "step 15" in results[0][1]

    a = checkpoint_tensors(tmp_path / "full" / "run" / "checkpoints" / "step_00000030")
    b = checkpoint_tensors(ckdir / "step_00000030")
    keys = [k for k in a if k.startswith(("model.", "optim."))]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(("model.", "optim.")))
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in metrics(tmp_path / "full" / "run")]
    lb = {r["step"]: r["loss"] for r in metrics(part / "run")}
    assert [lb[s] for s in range(1, steps + 1)] == la


@pytest.mark.parametrize("world", [3])
def test_sigkilled_rank_stops_every_other_rank(tmp_path: Path, world: int) -> None:
    """Rank 1 SIGKILLs itself at step 4: every other rank exits non-zero within the timeout,
    naming rank 1 and the step."""
    timeout_s = 20
    args = [*base_args(tmp_path, 200), "--training.batch_size", "6", "--parallel.timeout_s", str(timeout_s),
            "--faults.sigkill_at_step", "4", "--faults.rank", "1"]
    t0 = time.monotonic()
    results = wait_all(start_ranks(args, world, tmp_path), timeout=300)
    assert results[1][0] == -9
    for r, (code, _out, err) in enumerate(results):
        if r == 1:
            continue
        assert code == 4, f"rank {r} exit {code}: {err[-2000:]}"
        assert "rank 1" in err and "step 4" in err, err[-2000:]
    # start-up (imports, corpus, 4 steps) plus at most the timeout and the watchdog's grace
    assert time.monotonic() - t0 < 120 + timeout_s


def test_hung_rank_stops_every_rank_within_timeout(tmp_path: Path) -> None:
    """Rank 0 hangs at step 3: rank 1 fails its collective after parallel.timeout_s, the hung rank's
    watchdog ends it; both exit 4."""
    timeout_s = 10
    args = [*base_args(tmp_path, 200), "--parallel.timeout_s", str(timeout_s), "--faults.hang_at_step", "3",
            "--faults.rank", "0"]
    t0 = time.monotonic()
    results = wait_all(start_ranks(args, 2, tmp_path), timeout=300)
    assert [r[0] for r in results] == [4, 4], [r[2][-1500:] for r in results]
    assert "step 3" in results[1][2] and "rank 0" in results[1][2], results[1][2][-1500:]
    assert time.monotonic() - t0 < 120 + 3 * timeout_s


def test_nonfinite_steps_are_skipped_then_stop(tmp_path: Path) -> None:
    """A NaN loss at step 3 is skipped (no update, run goes on); with max_nan_skips 0 it ends with 3."""
    res = run_single([*base_args(tmp_path / "a", 5), "--faults.nan_at_step", "3"], cwd=tmp_path)
    _ok(res)
    recs = metrics(tmp_path / "a" / "run")
    assert [r["skipped"] for r in recs] == [False, False, True, False, False]
    assert math.isnan(recs[2]["loss"]) and math.isfinite(recs[3]["loss"])
    res = run_single([*base_args(tmp_path / "b", 5), "--faults.nan_at_step", "3", "--training.max_nan_skips", "0"],
                     cwd=tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite" in res.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--training.stepz", "3"], "unknown key training.stepz; valid keys of [training]: steps"),
    (["--training.steps", "three"], "training.steps: expected int"),
    (["--model.n_layerz", "3"], "unknown key model.n_layerz"),
    (["--model.n_activated_experts", "9"], "model: "),
    (["--parallel.ep", "3"], "parallel.ep=3 must divide"),
    (["--data.path", "/nonexistent/corpus"], "data.path '/nonexistent/corpus' does not exist"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    (["--parallel.schedule", "gpipe"], "parallel.schedule must be one of"),
])
def test_bad_config_or_data_exits_2_with_one_line(tmp_path: Path, argv: list[str], needle: str) -> None:
    res = run_single([*base_args(tmp_path, 3), *argv], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_bad_data_file_exits_2(tmp_path: Path) -> None:
    """A shard folder whose shard is truncated is refused before training."""
    data = tmp_path / "shards"
    data.mkdir()
    (data / "meta.json").write_text('{"format": 1, "tokenizer": "byte", "vocab_size": 256, "dtype": "uint16", '
                                    '"shards": [{"file": "shard_00000.bin", "tokens": 1000}]}')
    (data / "shard_00000.bin").write_bytes(b"\x01\x00" * 10)
    res = run_single([*base_args(tmp_path, 3), "--data.path", str(data)], cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "truncated" in res.stderr, res.stderr


def test_world_size_mismatch_exits_2_before_rendezvous(tmp_path: Path) -> None:
    """pp 2 with 3 ranks: refused from the environment alone (no rank 0 exists to rendezvous with)."""
    env = {**single_env(), "RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    res = subprocess.run([sys.executable, str(PRETRAIN), *base_args(tmp_path, 3), "--parallel.pp", "2"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "world size 3 is not a multiple of parallel.pp=2" in res.stderr, res.stderr


def test_mpirun_two_ranks(tmp_path: Path) -> None:
    mpirun = shutil.which("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpirun = None
    if mpirun is None:
        pytest.skip("MPI not available: apt-get install libopenmpi-dev openmpi-bin && pip install mpi4py")
    env = single_env()
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    res = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, str(PRETRAIN),
                          *base_args(tmp_path, 4)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    _ok(res)
    assert "launch: mpi, 2 rank(s)" in res.stdout
    assert len(metrics(tmp_path / "run")) == 4


def test_no_argument_default_short_run(tmp_path: Path) -> None:
    """The default config (tiny preset, default corpus) with only its step count shortened: it
    builds the corpus, trains, prints MFU, saves metrics, the loss curve and a checkpoint."""
    cache = tmp_path / "cache"
    res = run_single(["--training.steps", "4", "--data.cache_dir", str(cache)], cwd=tmp_path, timeout=300)
    _ok(res)
    assert "MFU" in res.stdout and "median MFU" in res.stdout
    run = tmp_path / "runs" / "tiny"
    assert len(metrics(run)) == 4 and (run / "config.toml").exists() and (run / "loss.png").exists()
    assert (run / "checkpoints" / "step_00000004" / "done.json").exists()


@pytest.mark.slow
def test_no_argument_default_full_run(tmp_path: Path) -> None:
    """`python launch/pretrain.py` with no arguments at all: finishes in minutes, the loss falls."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py")], env=single_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    _ok(res)
    recs = metrics(tmp_path / "runs" / "tiny")
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.5
    assert "median MFU" in res.stdout
    print(f"no-argument run: {time.monotonic() - t0:.0f}s, final loss {recs[-1]['loss']:.3f}")


def test_deepspeed_engine_zero1_two_ranks(tmp_path: Path) -> None:
    """--parallel.engine deepspeed (ZeRO stage 1, gloo on the CPU) trains the same model on 2 ranks;
    its first loss equals ours (same weights, same data) and later losses stay close."""
    pytest.importorskip("deepspeed")
    steps = 4
    ours = _layout_losses(tmp_path, "native", steps, [], [], 2)
    theirs = _layout_losses(tmp_path, "ds", steps, [], ["--parallel.engine", "deepspeed"], 2)
    assert abs(theirs[0] - ours[0]) < 1e-5 * ours[0]
    assert _max_rel(theirs, ours) < 1e-2
