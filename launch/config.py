"""The trainer's configuration: dataclass sections read from TOML, `--section.key value` overrides.

Why dataclasses: every key has a type and a default in one place, so an override from the command
line is parsed with the field's own type and an unknown key is rejected with the list of valid
ones. The ``[model]`` section is open-ended: besides ``module`` and ``preset`` it accepts any field
of the model's ``ModelArgs`` (typed by that dataclass), so the trainer never repeats the model's
field list.

Everything here runs before any process group exists: a bad config fails on every rank with the
same one-line message (``ConfigError``, exit code 2) instead of deep inside a collective.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.toml"

SCHEDULES = ("dualpipev", "dualpipe", "1f1b", "zb1p")
ENGINES = ("native", "deepspeed")
DTYPES = ("bf16", "fp32", "fp64")


class ConfigError(ValueError):
    """A configuration or data problem found before training starts (exit code 2)."""


@dataclass
class RunConfig:
    dir: str = "runs/tiny"  # run directory: resolved config, metrics.jsonl, TensorBoard, plots
    log_interval: int = 1  # progress line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True  # loss-curve PNG at the end
    calibration_cache: str = "runs/cache/cpu_peak.json"  # CPU matmul peak, measured once


@dataclass
class ModelConfig:
    module: str = "model"  # the package providing ModelArgs, Transformer, flops_per_token
    preset: str = "tiny"
    fields: dict[str, Any] = field(default_factory=dict)  # ModelArgs overrides, e.g. n_layers = 4


@dataclass
class TrainingConfig:
    steps: int = 200
    seed: int = 0
    dtype: str = "fp32"  # parameter/compute dtype: bf16, fp32 or fp64 (fp64 for exactness tests)
    batch_size: int = 8  # global batch in sequences per step (all data-parallel ranks together)
    micro_batches: int = 0  # micro-batches per step and DP rank; 0 = minimum the schedule needs
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    moments_dtype: str = "fp32"  # AdamW moments: fp32 or bf16
    max_nan_skips: int = 5  # non-finite steps skipped before the run stops (exit 3)


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline ranks
    dp: int = 0  # data-parallel ranks; 0 = world size / pp
    ep: int = 1  # expert-parallel ranks (inside each data-parallel group)
    schedule: str = "dualpipev"  # dualpipev, dualpipe, 1f1b, zb1p
    engine: str = "native"  # native, or deepspeed (no pipeline; ZeRO stage from zero_stage)
    zero_stage: int = 1  # deepspeed engine only: 1 or 2 (the native engine is ZeRO-1)
    backend: str = "auto"  # auto = nccl on GPUs, gloo on CPUs
    device: str = "auto"  # auto, cpu or cuda
    timeout_s: float = 300.0  # every collective; a dead or hung rank stops the run within this
    threads: int = 0  # torch CPU threads per rank; 0 = cores / local ranks


@dataclass
class DataConfig:
    path: str = ""  # token shard folder (launch/prepare_data.py) or text files; "" = default corpus
    cache_dir: str = "runs/cache"  # where the default corpus and prepared shards are cached
    tokenizer: str = "byte"  # byte, or bpe (with the `tokenizers` library)


@dataclass
class CheckpointConfig:
    interval: int = 100  # save every N steps; 0 = only on signals and at the end
    keep: int = 3  # keep the last K checkpoints
    folder: str = ""  # "" = <run.dir>/checkpoints
    resume: str = "none"  # none, auto (latest good checkpoint in folder), or a checkpoint path
    hf_export: bool = True  # write an HF-format checkpoint at the end (the model's save_hf_checkpoint)
    at_end: bool = True  # save a checkpoint after the last step


@dataclass
class FaultsConfig:
    """Fault injection for tests: one rank signals itself or stalls at a given step (-1 = never)."""

    sigterm_at_step: int = -1
    sigkill_at_step: int = -1
    hang_at_step: int = -1
    nan_at_step: int = -1  # the loss of this step is replaced by NaN (tests the skip logic)
    rank: int = 0  # the rank that misbehaves


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "model":
                section.update(section.pop("fields"))
            out[f.name] = section
        return out

    def to_toml(self) -> str:
        lines = []
        for name, section in self.to_dict().items():
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in section.items())
            lines.append("")
        return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


# ---------------------------------------------------------------------------------------------
# parsing


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Converts a TOML value or a command-line string to ``typ``; raises ConfigError naming ``where``."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    return value


def _model_arg_types(module_name: str) -> dict[str, Any]:
    """ModelArgs field types of the model package named in [model] module."""
    try:
        module = importlib.import_module(module_name)
        model_args = module.ModelArgs
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.module: cannot import ModelArgs from {module_name!r} ({e})") from None
    return _section_types(model_args)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads ``path`` (default: tiny.toml), applies ``--section.key value`` overrides, validates types.

    Cross-field checks that need the world size live in ``validate``.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path.name).exists() and path.parent == Path():
        path = CONFIG_DIR / path.name
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None

    pairs: list[tuple[str, str, Any]] = []
    for section, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path.name}: top-level key {section!r} must be a [section]")
        pairs.extend((section, k, v) for k, v in body.items())
    pairs.extend(parse_overrides(overrides or []))

    cfg = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    model_fields: dict[str, Any] = {}
    for section, key, value in pairs:
        if section not in sections:
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(sections)}")
        obj = getattr(cfg, section)
        types = _section_types(type(obj))
        if section == "model" and key not in ("module", "preset"):
            model_fields[key] = value  # typed once model.module is known
            continue
        if key not in types or (section == "model" and key == "fields"):
            valid = [k for k in types if k != "fields"]
            raise ConfigError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(valid)}")
        setattr(obj, key, _coerce(value, types[key], f"{section}.{key}"))

    if model_fields:
        arg_types = _model_arg_types(cfg.model.module)
        for key, value in model_fields.items():
            if key not in arg_types:
                valid = ["module", "preset", *arg_types]
                raise ConfigError(f"unknown key model.{key}; valid keys of [model]: {', '.join(valid)}")
            cfg.model.fields[key] = _coerce(value, arg_types[key], f"model.{key}")
    return cfg


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """``["--training.steps", "10", "--run.dir=x"]`` -> ``[("training", "steps", "10"), ("run", "dir", "x")]``."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            value = argv[i + 1]
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key.replace("-", "_"), value))
        i += 1
    return out


# ---------------------------------------------------------------------------------------------
# validation (before any process group)


def split_layers(n_layers: int, n_stages: int) -> list[int]:
    """Layers per pipeline stage, as even as possible, extra layers on the earliest stages.

    61 layers over 16 stages -> 13 stages of 4 and 3 of 3. Raises ConfigError when a stage would
    have no layer.
    """
    if n_stages < 1:
        raise ConfigError(f"pipeline stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise ConfigError(f"model.n_layers={n_layers} cannot fill {n_stages} pipeline stages: "
                          f"a stage without layers is not allowed")
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if s < extra else 0) for s in range(n_stages)]


def num_stages(pp: int, schedule: str) -> int:
    """DualPipeV holds two stages per rank (a V); the others one stage per rank."""
    return 2 * pp if schedule == "dualpipev" else pp


@dataclass
class Layout:
    """The validated parallel layout and batch geometry of a run."""

    world: int
    pp: int
    dp: int
    ep: int
    stages: int
    layers_per_stage: list[int]
    micro_batches: int  # per step and data-parallel rank
    local_batch: int  # sequences per step on one data-parallel rank


def validate(cfg: Config, world_size: int, model_args: Any | None = None) -> Layout:
    """Cross-field checks; ``model_args`` (the resolved ModelArgs) enables the model-dependent ones."""
    t, p = cfg.training, cfg.parallel

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(t.steps >= 1, f"training.steps must be >= 1, got {t.steps}")
    need(t.batch_size >= 1, f"training.batch_size must be >= 1, got {t.batch_size}")
    need(t.seq_len >= 2, f"training.seq_len must be >= 2, got {t.seq_len}")
    need(t.lr > 0, f"training.lr must be > 0, got {t.lr}")
    need(0 <= t.min_lr_ratio <= 1, f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "training.beta1 and beta2 must be in [0, 1)")
    need(t.dtype in DTYPES, f"training.dtype must be one of {DTYPES}, got {t.dtype!r}")
    need(t.moments_dtype in ("fp32", "bf16"), f"training.moments_dtype must be fp32 or bf16, got {t.moments_dtype!r}")
    need(t.grad_clip >= 0, f"training.grad_clip must be >= 0, got {t.grad_clip}")
    need(t.max_nan_skips >= 0, f"training.max_nan_skips must be >= 0, got {t.max_nan_skips}")
    need(p.schedule in SCHEDULES, f"parallel.schedule must be one of {SCHEDULES}, got {p.schedule!r}")
    need(p.engine in ENGINES, f"parallel.engine must be one of {ENGINES}, got {p.engine!r}")
    need(p.backend in ("auto", "gloo", "nccl"), f"parallel.backend must be auto, gloo or nccl, got {p.backend!r}")
    need(p.device in ("auto", "cpu", "cuda"), f"parallel.device must be auto, cpu or cuda, got {p.device!r}")
    need(p.timeout_s > 0, f"parallel.timeout_s must be > 0, got {p.timeout_s}")
    need(p.pp >= 1, f"parallel.pp must be >= 1, got {p.pp}")
    need(p.ep >= 1, f"parallel.ep must be >= 1, got {p.ep}")
    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    need(cfg.checkpoint.interval >= 0, f"checkpoint.interval must be >= 0, got {cfg.checkpoint.interval}")
    need(cfg.data.tokenizer in ("byte", "bpe"), f"data.tokenizer must be byte or bpe, got {cfg.data.tokenizer!r}")

    need(world_size % p.pp == 0, f"world size {world_size} is not a multiple of parallel.pp={p.pp}")
    dp = p.dp or world_size // p.pp
    need(dp * p.pp == world_size, f"world size {world_size} must equal parallel.pp x parallel.dp = {p.pp} x {dp}")
    need(dp % p.ep == 0, f"parallel.ep={p.ep} must divide the data-parallel size {dp}")
    if p.engine == "deepspeed":
        need(p.pp == 1, "parallel.engine=deepspeed runs without pipeline parallel: set parallel.pp=1")
        need(p.ep == 1, "parallel.engine=deepspeed runs without expert parallel here: set parallel.ep=1")
        need(p.zero_stage in (1, 2), f"parallel.zero_stage must be 1 or 2, got {p.zero_stage}")
    if p.schedule == "dualpipe" and p.pp > 1:
        need(p.pp % 2 == 0, f"parallel.schedule=dualpipe needs an even parallel.pp, got {p.pp}")

    need(t.batch_size % dp == 0, f"training.batch_size={t.batch_size} must be a multiple of the data-parallel size {dp}")
    local_batch = t.batch_size // dp
    min_chunks = 2 * p.pp if (p.pp > 1 and p.schedule in ("dualpipev", "dualpipe")) else p.pp
    chunks = t.micro_batches or (min_chunks if p.pp > 1 else 1)
    if p.pp > 1:
        need(chunks >= min_chunks, f"training.micro_batches={chunks} is below the {min_chunks} that "
                                   f"schedule {p.schedule} needs with parallel.pp={p.pp}")
        if p.schedule == "dualpipe":
            need(chunks % 2 == 0, f"training.micro_batches must be even for dualpipe, got {chunks}")
    need(local_batch % chunks == 0, f"the {local_batch} sequences per data-parallel rank do not split into "
                                    f"training.micro_batches={chunks} equal micro-batches")
    need(local_batch >= chunks, f"each data-parallel rank gets {local_batch} sequences per step, fewer than "
                                f"training.micro_batches={chunks}: raise training.batch_size")

    stages = num_stages(p.pp, p.schedule) if p.pp > 1 else 1
    layers = [0]
    if model_args is not None:
        n_layers = int(model_args.n_layers)
        layers = split_layers(n_layers, stages)
        n_experts = int(getattr(model_args, "n_routed_experts", 0) or 0)
        if n_experts:
            need(n_experts % p.ep == 0, f"parallel.ep={p.ep} must divide model.n_routed_experts={n_experts}")
        max_seq = getattr(model_args, "max_seq_len", None)
        if max_seq is not None:
            need(t.seq_len <= int(max_seq), f"training.seq_len={t.seq_len} exceeds model.max_seq_len={max_seq}")
    return Layout(world=world_size, pp=p.pp, dp=dp, ep=p.ep, stages=stages, layers_per_stage=layers,
                  micro_batches=chunks, local_batch=local_batch)
