"""ModelArgs: presets build, bad configs raise errors naming the field, HF config conversion."""

from __future__ import annotations

import pytest

from model import ModelArgs


@pytest.mark.parametrize("name", ["tiny", "debug", "16B", "671B"])
def test_presets_validate(name: str) -> None:
    args = ModelArgs.preset(name)
    assert args.n_layers > args.n_dense_layers


def test_671b_preset_has_the_reference_dims() -> None:
    # shared/REFERENCE.md, "DeepSeek-V3 architecture (671B configuration)"
    a = ModelArgs.preset("671B")
    assert (a.vocab_size, a.dim, a.inter_dim, a.moe_inter_dim, a.n_layers, a.n_dense_layers, a.n_heads) == (
        129280, 7168, 18432, 2048, 61, 3, 128)
    assert (a.n_routed_experts, a.n_shared_experts, a.n_activated_experts, a.n_expert_groups, a.n_limited_groups) == (
        256, 1, 8, 8, 4)
    assert (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (1536, 512, 128, 64, 128)
    assert a.score_func == "sigmoid" and a.route_scale == 2.5 and a.yarn_active


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="tiny"):
        ModelArgs.preset("huge")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(n_routed_experts=10, n_expert_groups=4, n_limited_groups=2), "n_expert_groups"),
        (dict(n_activated_experts=5, n_expert_groups=2, n_limited_groups=1), "n_activated_experts"),
        (dict(n_routed_experts=8, n_expert_groups=8, n_limited_groups=4), "n_expert_groups"),
        (dict(n_limited_groups=3, n_expert_groups=2), "n_limited_groups"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(n_heads=0), "n_heads"),
        (dict(dim=-4), "dim"),
        (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
        (dict(score_func="relu"), "score_func"),
        (dict(dtype="float16"), "dtype"),
        (dict(n_dense_layers=9), "n_dense_layers"),
        (dict(n_mtp_layers=2), "n_mtp_layers"),
        (dict(route_scale=0.0), "route_scale"),
        (dict(beta_fast=1, beta_slow=32), "beta_fast"),
        (dict(fp8=1), "fp8"),
        (dict(fp8=True, dtype="float64"), "fp8"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(vocab_size=2.5), "vocab_size"),
    ],
)
def test_bad_config_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelArgs.preset("tiny", **changes)


def test_softmax_scale_gets_mscale_squared_only_with_yarn() -> None:
    # DeepSeek's reference: mscale = 0.1 * mscale * ln(factor) + 1, applied squared, only when
    # max_seq_len > original_seq_len.
    import math

    a = ModelArgs.preset("671B")
    m = 0.1 * 1.0 * math.log(40.0) + 1
    assert a.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    b = a.replace(max_seq_len=4096)
    assert not b.yarn_active and b.softmax_scale == pytest.approx(192**-0.5, rel=1e-12)


def test_from_hf_config_reads_deepseek_v3_fields() -> None:
    cfg = {
        "model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 8192,
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "norm_topk_prob": True,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_theta": 10000, "torch_dtype": "bfloat16",
    }
    a = ModelArgs.from_hf_config(cfg)
    assert a.score_func == "sigmoid" and a.n_expert_groups == 4 and a.n_limited_groups == 2
    assert a.rope_factor == 40.0 and a.original_seq_len == 4096 and a.max_seq_len == 8192 and a.yarn_active
    assert a.n_mtp_layers == 1 and a.dim == 64 and a.dtype == "bfloat16"
    no_yarn = ModelArgs.from_hf_config({**cfg, "rope_scaling": None})
    assert not no_yarn.yarn_active
