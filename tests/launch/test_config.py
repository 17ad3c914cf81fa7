"""launch/config.py: TOML + overrides, typing, unknown keys, cross-field validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from launch.config import CONFIG_DIR, ConfigError, load_config, parse_overrides, split_layers, validate
from launch.trainer import resolve_model_args


@pytest.mark.parametrize("name, world, pp, stages", [
    ("tiny.toml", 1, 1, 1),
    ("debug.toml", 1, 1, 1),
    ("16b.toml", 16, 2, 4),  # DualPipeV: two stages per rank
    ("671b.toml", 2048, 16, 16),  # DualPipe: one stage per rank (DeepSeek-V3 report, section 3.2)
])
def test_shipped_configs_validate_at_their_world_size(name: str, world: int, pp: int, stages: int) -> None:
    cfg = load_config(CONFIG_DIR / name)
    layout = validate(cfg, world, resolve_model_args(cfg))
    assert (layout.pp, layout.stages, layout.world) == (pp, stages, world)
    assert sum(layout.layers_per_stage) == resolve_model_args(cfg).n_layers


def test_671b_layout_is_deepseeks() -> None:
    cfg = load_config(CONFIG_DIR / "671b.toml")
    args = resolve_model_args(cfg)
    layout = validate(cfg, 2048, args)
    assert (layout.pp, layout.dp, layout.ep, cfg.parallel.schedule) == (16, 128, 64, "dualpipe")
    assert layout.layers_per_stage == [4] * 13 + [3] * 3
    assert args.n_layers == 61 and args.fp8


def test_overrides_are_typed_by_the_dataclass_fields() -> None:
    cfg = load_config(None, ["--training.steps", "7", "--training.lr=0.5", "--run.tensorboard", "false",
                             "--model.n_layers", "4", "--parallel.schedule", "1f1b", "--checkpoint.resume", "auto"])
    assert cfg.training.steps == 7 and isinstance(cfg.training.steps, int)
    assert cfg.training.lr == 0.5 and cfg.run.tensorboard is False
    assert cfg.model.fields["n_layers"] == 4 and isinstance(cfg.model.fields["n_layers"], int)
    assert (cfg.parallel.schedule, cfg.checkpoint.resume) == ("1f1b", "auto")


@pytest.mark.parametrize("argv, needle", [
    (["--training.steps", "2.5"], "training.steps: expected int"),
    (["--run.plot", "maybe"], "run.plot: expected bool"),
    (["--training.lr", "fast"], "training.lr: expected float"),
    (["--model.n_heads", "x"], "model.n_heads: expected int"),
])
def test_bad_types_name_the_key(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, argv)


def test_unknown_keys_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--training.step", "3"])
    assert "unknown key training.step;" in str(e.value) and "steps, seed, dtype" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown section \[trainng\]; valid sections: run, model"):
        load_config(None, ["--trainng.steps", "3"])
    with pytest.raises(ConfigError, match=r"unknown key model.dimm; valid keys of \[model\]: module, preset, vocab_size"):
        load_config(None, ["--model.dimm", "3"])
    with pytest.raises(ConfigError, match=r"overrides look like"):
        parse_overrides(["steps=3"])


def test_toml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(bad)
    bad.write_text("[training]\nwarmup = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key training.warmup"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["--training.steps", "11", "--model.n_layers", "5", "--data.path", "x y"])
    saved = tmp_path / "config.toml"
    saved.write_text(cfg.to_toml())
    assert load_config(saved).to_dict() == cfg.to_dict()


def test_split_layers_is_as_even_as_possible() -> None:
    assert split_layers(61, 16) == [4] * 13 + [3] * 3
    for _ in range(200):
        stages = random.randint(1, 40)
        layers = random.randint(stages, 130)
        split = split_layers(layers, stages)
        assert sum(split) == layers and len(split) == stages and max(split) - min(split) <= 1 and min(split) >= 1
    with pytest.raises(ConfigError, match=r"a stage without layers"):
        split_layers(3, 4)


@pytest.mark.parametrize("argv, world, needle", [
    ([], 3, None),
    (["--parallel.pp", "2"], 3, "world size 3 is not a multiple of parallel.pp=2"),
    (["--parallel.dp", "2"], 4, "must equal parallel.pp x parallel.dp = 1 x 2"),
    (["--parallel.ep", "4"], 6, "parallel.ep=4 must divide the data-parallel size 6"),
    (["--parallel.ep", "3", "--training.batch_size", "3"], 3, "parallel.ep=3 must divide model.n_routed_experts=8"),
    (["--parallel.pp", "2"], 2, "cannot fill 4 pipeline stages"),  # tiny: 3 layers, DualPipeV 2 x 2 stages
    (["--parallel.pp", "2", "--parallel.schedule", "1f1b"], 4, None),
    (["--parallel.pp", "3", "--parallel.schedule", "dualpipe", "--model.n_layers", "6"], 3, "even parallel.pp"),
    (["--training.batch_size", "6"], 4, "must be a multiple of the data-parallel size 4"),
    (["--parallel.pp", "2", "--model.n_layers", "4", "--training.micro_batches", "2"], 2, "below the 4 that schedule"),
    (["--training.micro_batches", "5"], 1, "do not split into"),
    (["--training.seq_len", "4096"], 1, "exceeds model.max_seq_len=256"),
    (["--parallel.engine", "deepspeed", "--parallel.pp", "2", "--model.n_layers", "4"], 2, "without pipeline"),
])
def test_validation_before_any_process_group(argv: list[str], world: int, needle: str | None) -> None:
    cfg = load_config(None, ["--training.batch_size", "12", *argv] if "--training.batch_size" not in argv else argv)
    if needle is None:
        validate(cfg, world, resolve_model_args(cfg))
    else:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            validate(cfg, world, resolve_model_args(cfg))


def test_model_args_errors_become_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model: .*n_activated_experts"):
        resolve_model_args(load_config(None, ["--model.n_activated_experts", "9"]))
    with pytest.raises(ConfigError, match=r"contradicts training.dtype"):
        resolve_model_args(load_config(None, ["--model.dtype", "bfloat16", "--training.dtype", "fp64"]))
