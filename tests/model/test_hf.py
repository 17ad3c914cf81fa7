"""HF interop: our model on HF weights equals transformers' DeepseekV3ForCausalLM (an independent
implementation of the architecture), and save/load round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from model import ModelArgs, Transformer
from model.hf import _dequantize, load_hf_checkpoint, save_hf_checkpoint
from ops import calc_diff, per_block_cast_to_fp8

transformers = pytest.importorskip("transformers")


def _hf_model(yarn: bool, q_lora_rank: int | None):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0} if yarn else None
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=512, rope_scaling=rope, rope_interleave=True,
    )
    hf = transformers.DeepseekV3ForCausalLM(cfg).double().eval()
    hf.set_experts_implementation("eager")  # torch's CPU grouped_mm has no float64
    with torch.no_grad():  # make norms and the selection bias non-trivial
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            if "norm" in name or "e_score_correction_bias" in name:
                t.add_(torch.randn_like(t) * 0.1)
    return hf


@pytest.mark.parametrize(("yarn", "q_lora_rank"), [(True, 32), (False, None)])
def test_logits_match_hf_deepseek_v3_on_its_weights(tmp_path, yarn: bool, q_lora_rank: int | None) -> None:
    hf = _hf_model(yarn, q_lora_rank)
    hf.save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path, dtype="float64")
    assert model.args.yarn_active == yarn and model.args.n_mtp_layers == 0  # HF saves no MTP weights
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = model(tokens)
    # HF's router runs in float32 even in a float64 model, hence not 1e-14
    assert calc_diff(got, ref) < 1e-12


def test_saved_checkpoint_loads_in_hf_and_back_identically(tmp_path) -> None:
    args = ModelArgs.preset("tiny", dtype="float64", max_seq_len=512, original_seq_len=128, rope_factor=4.0)
    model = Transformer(args)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.expert_bias.copy_(torch.randn_like(m.gate.expert_bias) * 0.1)
    save_hf_checkpoint(model, tmp_path)
    back = load_hf_checkpoint(tmp_path)
    assert back.args == args
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    hf.set_experts_implementation("eager")
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    with torch.no_grad():
        assert calc_diff(model(tokens), hf(tokens).logits) < 1e-12
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_fp8_weights_are_dequantized_by_multiplying_the_block_scale(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    args = ModelArgs.preset("tiny", dtype="float32", n_mtp_layers=0)
    save_hf_checkpoint(Transformer(args), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    w = tensors[name] * 300  # not 1: the scales must matter
    q, s = per_block_cast_to_fp8(w)
    tensors[name], tensors[name + "_scale_inv"] = q, s
    save_file(tensors, tmp_path / "model.safetensors")
    model = load_hf_checkpoint(tmp_path)
    got = model.layers[1].attn.wkv_b.weight
    assert torch.equal(got, _dequantize(q, s))
    assert calc_diff(got, w) < 1e-3


def test_missing_tensors_and_pickles_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint(Transformer(ModelArgs.preset("tiny", dtype="float32")), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"experts\.3\.up_proj"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_hf_checkpoint(tmp_path)


def test_softmax_models_are_not_saved_in_deepseek_v3_format(tmp_path) -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        save_hf_checkpoint(Transformer(ModelArgs.preset("tiny", score_func="softmax")), tmp_path)
