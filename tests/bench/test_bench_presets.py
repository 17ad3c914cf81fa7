"""The MFU benchmark presets (launch/configs/bench.toml, bench_gpu.toml) load, validate and have
the sizes their comments promise: the GPU one is a 1B-class MoE that fits one GPU, the CPU one
is small enough for about a minute on 2 cores."""

from __future__ import annotations

import pytest

from launch.config import CONFIG_DIR, load_config, validate
from launch.trainer import resolve_model_args
from model.flops import count_params, flops_per_token


def _resolved(name: str):
    cfg = load_config(CONFIG_DIR / name, [])
    args = resolve_model_args(cfg)
    validate(cfg, 1, args)
    return cfg, args


def test_gpu_preset_is_a_1b_class_moe_that_fits_one_gpu() -> None:
    cfg, args = _resolved("bench_gpu.toml")
    total, active = count_params(args)
    assert 0.8e9 <= total <= 1.5e9, f"{total / 1e9:.2f}B parameters is not 1B-class"
    assert active < total / 3, "an MoE activates a small part of its parameters per token"
    assert args.n_routed_experts > args.n_activated_experts > 1
    # bf16 weights and gradients, fp32 AdamW moments (launch/optim.py): 12 bytes per parameter,
    # well under the 80 GB of the smallest Hopper GPU, leaving room for activations.
    assert cfg.training.dtype == "bf16" and cfg.training.moments_dtype == "fp32"
    assert 12 * total < 40e9
    assert cfg.parallel.device == "cuda" and cfg.training.steps >= 4  # test_mfu_cuda times steps - 2


def test_cpu_preset_is_small_enough_for_two_cores() -> None:
    cfg, args = _resolved("bench.toml")
    t = cfg.training
    flops_per_step = flops_per_token(args, t.seq_len) * t.batch_size * t.seq_len
    # about a minute on 2 cores at tens of GFLOP/s: each step well under 500 GFLOP
    assert flops_per_step * t.steps < 1.5e12, f"{flops_per_step * t.steps / 1e9:.0f} GFLOP in all"
    assert t.steps >= 3 and cfg.checkpoint.interval == 0 and not cfg.checkpoint.at_end


@pytest.mark.parametrize("name", ["bench.toml", "bench_gpu.toml"])
def test_presets_do_not_write_checkpoints_or_exports(name: str) -> None:
    cfg, _ = _resolved(name)
    assert cfg.checkpoint.interval == 0 and not cfg.checkpoint.at_end and not cfg.checkpoint.hf_export
