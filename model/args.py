"""`ModelArgs`: the DeepSeek-V3 configuration (field names as in DeepSeek's reference
`ModelArgs`), its validation, the preset table and the conversion from a HF `config.json`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ModelArgs:
    """Every shape and switch of the model. Validated on construction: a bad value raises
    ValueError naming the field.

    Fields after `mscale` are this project's additions: MTP depth and loss weight, the
    aux-loss-free bias update speed (gamma), the sequence-wise balance loss alpha, the parameter
    dtype and the FP8 switch (linears of MLA/MoE/FFN through `ops.fp8_linear`)."""

    vocab_size: int = 2048
    dim: int = 256
    inter_dim: int = 1024
    moe_inter_dim: int = 256
    n_layers: int = 6
    n_dense_layers: int = 1
    n_heads: int = 16
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 2
    n_activated_experts: int = 3
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    # MLA
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # YaRN
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    max_seq_len: int = 4096
    # this project's additions
    n_mtp_layers: int = 1
    mtp_loss_weight: float = 0.3
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 0.0001
    dtype: str = "bfloat16"
    fp8: bool = False
    norm_eps: float = 1e-6

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        positive = [
            "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
            "n_activated_experts", "n_expert_groups", "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "original_seq_len", "max_seq_len",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        for name in ["n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_layers"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelArgs.{name} must be a non-negative int, got {value!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"ModelArgs.n_dense_layers ({self.n_dense_layers}) exceeds n_layers ({self.n_layers})")
        if self.n_mtp_layers > 1:
            raise ValueError(f"ModelArgs.n_mtp_layers must be 0 or 1 (depth-1 MTP as in DeepSeek-V3), got {self.n_mtp_layers}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelArgs.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"ModelArgs.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(
                f"ModelArgs.n_expert_groups ({self.n_expert_groups}) must divide n_routed_experts ({self.n_routed_experts})"
            )
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and per_group < 2:
            raise ValueError(
                f"ModelArgs.n_expert_groups ({self.n_expert_groups}) leaves {per_group} expert per group; "
                "group scores sum each group's top-2 experts, so a group needs at least 2"
            )
        if self.n_limited_groups > self.n_expert_groups:
            raise ValueError(
                f"ModelArgs.n_limited_groups ({self.n_limited_groups}) exceeds n_expert_groups ({self.n_expert_groups})"
            )
        if self.n_activated_experts > self.n_limited_groups * per_group:
            raise ValueError(
                f"ModelArgs.n_activated_experts ({self.n_activated_experts}) exceeds the experts allowed by group "
                f"limiting (n_limited_groups * experts per group = {self.n_limited_groups * per_group})"
            )
        for name in ["route_scale", "rope_theta", "rope_factor", "mscale"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive finite number, got {value!r}")
        for name in ["mtp_loss_weight", "bias_update_speed", "seq_aux_alpha"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"ModelArgs.{name} must be a non-negative finite number, got {value!r}")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"ModelArgs.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelArgs.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"ModelArgs.fp8 must be a bool, got {self.fp8!r}")
        if self.fp8 and self.dtype == "float64":
            raise ValueError("ModelArgs.fp8 needs dtype 'float32' or 'bfloat16' master weights, not 'float64'")
        if not (isinstance(self.norm_eps, float) and 0 < self.norm_eps < 1):
            raise ValueError(f"ModelArgs.norm_eps must be a float in (0, 1), got {self.norm_eps!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_active(self) -> bool:
        """DeepSeek's reference applies YaRN and the mscale correction only in this case."""
        return self.max_seq_len > self.original_seq_len and self.rope_factor > 1

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn_active:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    def replace(self, **changes: Any) -> ModelArgs:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelArgs:
        """`tiny` (byte-level, trains on 2 CPU cores in minutes), `debug` (the public trainers'
        debug shape), `16B` (V2-Lite-like) and `671B` (DeepSeek-V3), with optional overrides."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    # ------------------------------------------------------------------ HF config
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Reads a DeepSeek-V3 (or V2) HF `config.json` dict. MTP depth comes from
        `num_nextn_predict_layers`; YaRN from `rope_scaling` (or `rope_parameters`). HF applies YaRN
        whenever rope_scaling is set, DeepSeek's reference only when max_seq_len exceeds
        original_seq_len: max_seq_len defaults to max_position_embeddings, which is what makes the
        two agree for the released configs."""
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        scaling = rope.get("rope_type", rope.get("type")) in ("yarn", "deepseek_yarn")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        topk_method = config.get("topk_method", "noaux_tc")
        score_func = config.get("scoring_func", "sigmoid" if topk_method == "noaux_tc" else "softmax")
        if config.get("model_type") == "deepseek_v3" and "scoring_func" not in config:
            score_func = "sigmoid"
        if score_func == "sigmoid" and config.get("norm_topk_prob", True) is False:
            raise ValueError("config.norm_topk_prob=False with sigmoid scores is not DeepSeek-V3's routing; unsupported")
        n_layers = config["num_hidden_layers"]
        kwargs: dict[str, Any] = dict(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            inter_dim=config["intermediate_size"],
            moe_inter_dim=config["moe_intermediate_size"],
            n_layers=n_layers,
            n_dense_layers=min(config.get("first_k_dense_replace", 0), n_layers),
            n_heads=config["num_attention_heads"],
            n_routed_experts=config["n_routed_experts"],
            n_shared_experts=config.get("n_shared_experts") or 0,
            n_activated_experts=config["num_experts_per_tok"],
            n_expert_groups=config.get("n_group") or 1,
            n_limited_groups=config.get("topk_group") or 1,
            score_func=score_func,
            route_scale=float(config.get("routed_scaling_factor", 1.0)),
            q_lora_rank=config.get("q_lora_rank") or 0,
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            rope_theta=float(theta),
            max_seq_len=config.get("max_position_embeddings", 4096),
            n_mtp_layers=config.get("num_nextn_predict_layers", 0) or 0,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            dtype={"float32": "float32", "float64": "float64"}.get(str(config.get("torch_dtype", config.get("dtype"))), "bfloat16"),
        )
        if scaling:
            kwargs.update(
                rope_factor=float(rope["factor"]),
                original_seq_len=int(rope.get("original_max_position_embeddings", 4096)),
                beta_fast=int(rope.get("beta_fast", 32)),
                beta_slow=int(rope.get("beta_slow", 1)),
                mscale=float(rope.get("mscale_all_dim", rope.get("mscale", 1.0)) or 1.0),
            )
        else:
            # no YaRN: make original_seq_len cover max_seq_len so it stays off
            kwargs.update(rope_factor=1.0, original_seq_len=kwargs["max_seq_len"])
        kwargs.update(overrides)
        return cls(**kwargs)


ModelArgs.PRESETS = {
    # Byte-level toy: trains on 2 CPU cores in minutes (about 1.2M parameters).
    "tiny": dict(
        vocab_size=256, dim=128, inter_dim=384, moe_inter_dim=96, n_layers=3, n_dense_layers=1, n_heads=4,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
        score_func="sigmoid", route_scale=1.0, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256, original_seq_len=256, rope_factor=1.0,
        dtype="float32",
    ),
    # The debug shape of public DeepSeek-V3 trainers (torchtitan's debugmodel dims; REFERENCE.md),
    # with V3's sigmoid routing so that HF's DeepseekV3 (sigmoid only) can run the same config.
    "debug": dict(
        vocab_size=2048, dim=256, inter_dim=1024, moe_inter_dim=256, n_layers=6, n_dense_layers=1, n_heads=16,
        n_routed_experts=8, n_shared_experts=2, n_activated_experts=3, n_expert_groups=1, n_limited_groups=1,
        score_func="sigmoid", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096, original_seq_len=4096, rope_factor=1.0,
    ),
    # DeepSeek-V2-Lite-like 16B shape (REFERENCE.md).
    "16B": dict(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16,
        n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1, n_limited_groups=1,
        score_func="softmax", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096 * 4, original_seq_len=4096, rope_factor=40.0,
        mscale=0.707,
    ),
    # DeepSeek-V3 671B (REFERENCE.md table; max_seq_len as in DeepSeek's config_671B, YaRN on).
    "671B": dict(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3, n_heads=128,
        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
        score_func="sigmoid", route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096 * 4, original_seq_len=4096, rope_factor=40.0,
        beta_fast=32, beta_slow=1, mscale=1.0,
    ),
}
