"""DeepSeek-V3 checkpoints in HF format: config.json + safetensors shards with DeepSeek's
parameter names (`model.layers.N.self_attn.q_a_proj.weight`, `...mlp.experts.E.gate_proj.weight`,
`...mlp.gate.e_score_correction_bias`, MTP at `model.layers.{n_layers}.*`).

Safetensors only: a pickle file is never opened. FP8 weights (float8_e4m3fn with a
`weight_scale_inv` of 128x128 block scales) are dequantized by MULTIPLYING by the scale."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from model.args import ModelArgs
from model.moe import MoE
from model.transformer import Transformer

_ATTN = {
    "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


def hf_name(name: str, n_layers: int) -> str | list[str]:
    """HF checkpoint name(s) of one of our state_dict entries. Stacked expert tensors map to a
    list of per-expert names (one per row of the stack, global expert ids for EP shards handled
    by the caller)."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"mtp\.0\.(enorm|hnorm|eh_proj|norm)\.weight", name)
    if m:
        return f"model.layers.{n_layers}.{_MTP[m.group(1)]}.weight"
    m = re.fullmatch(r"(?:layers\.(\d+)|mtp\.0\.block)\.(.+)", name)
    if not m:
        raise KeyError(f"no HF name for parameter {name!r}")
    layer = int(m.group(1)) if m.group(1) is not None else n_layers
    rest = m.group(2)
    prefix = f"model.layers.{layer}."
    parts = rest.split(".")
    if parts[0] in _BLOCK:
        return prefix + _BLOCK[parts[0]] + ".weight"
    if parts[0] == "attn":
        return prefix + "self_attn." + _ATTN[parts[1]] + ".weight"
    if parts[0] == "ffn":
        if parts[1] in _MLP:
            return prefix + "mlp." + _MLP[parts[1]] + ".weight"
        if parts[1] == "gate":
            return prefix + ("mlp.gate.weight" if parts[2] == "weight" else "mlp.gate.e_score_correction_bias")
        if parts[1] == "shared_experts":
            return prefix + "mlp.shared_experts." + _MLP[parts[2]] + ".weight"
        if parts[1] == "experts":
            return prefix + "mlp.experts.{e}." + _MLP[parts[2]] + ".weight"
    raise KeyError(f"no HF name for parameter {name!r}")


def _targets(model: Transformer) -> dict[str, tuple[torch.Tensor, int | None]]:
    """HF name -> (our tensor or stacked-expert row, global expert id or None), for every tensor a
    checkpoint fills: parameters plus the expert-bias buffers."""
    n_layers = model.args.n_layers
    out: dict[str, tuple[torch.Tensor, int | None]] = {}
    starts = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MoE):
            starts[mod_name + ".experts"] = mod.expert_start
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("gate.expert_bias"))
    for name, t in tensors.items():
        hf = hf_name(name, n_layers)
        if "{e}" in hf:
            start = starts[name.rsplit(".", 1)[0]]
            for i in range(t.size(0)):
                out[hf.format(e=start + i)] = (t[i], start + i)
        else:
            out[hf] = (t, None)
    return out


def hf_config(args: ModelArgs) -> dict:
    """The HF `config.json` (model_type deepseek_v3, interleaved rope) for these args."""
    if args.score_func != "sigmoid":
        raise ValueError("HF's DeepseekV3 routes with sigmoid scores only: a model with score_func='softmax' "
                         "cannot be saved in its format (its logits would silently differ)")
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim, "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads, "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts, "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups, "topk_group": args.n_limited_groups, "routed_scaling_factor": args.route_scale,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "q_lora_rank": args.q_lora_rank or None, "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim, "max_position_embeddings": args.max_seq_len,
        "num_nextn_predict_layers": args.n_mtp_layers, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_interleave": True, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "dtype": args.dtype, "torch_dtype": args.dtype,
    }
    if args.yarn_active:
        cfg["rope_scaling"] = {
            "type": "yarn", "rope_type": "yarn", "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len, "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow, "mscale": args.mscale, "mscale_all_dim": args.mscale,
        }
    else:
        cfg["rope_scaling"] = None
    return cfg


def save_hf_checkpoint(model: Transformer, directory: str | os.PathLike) -> None:
    """Writes config.json and model.safetensors (DeepSeek-V3 names, MTP at layer n_layers) that
    HF transformers' DeepseekV3ForCausalLM loads (it ignores the MTP layer)."""
    from safetensors.torch import save_file

    if any(m.ep_size > 1 for m in model.moe_layers()):
        raise ValueError("save_hf_checkpoint needs the whole model: gather expert-parallel shards first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, (t, _) in _targets(model).items()}
    if model.args.n_mtp_layers:  # DeepSeek's MTP layer carries its own copies of embedding and head
        n = model.args.n_layers
        tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.args), indent=2))


def _shards(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors file in {directory}{hint}")
    return files


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 weight [N, K] with block scales [ceil(N/128), ceil(K/128)] -> float32 (weight * scale)."""
    n, k = weight.shape
    expected = (math.ceil(n / block), math.ceil(k / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {n}x{k} (expected {expected})")
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return weight.float() * s


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    ep_group: dist.ProcessGroup | None = None,
    **overrides,
) -> Transformer:
    """Builds a `Transformer` from a DeepSeek-V3-format checkpoint directory. `dtype` ("bfloat16",
    "float32", "float64" or the torch dtype) overrides config.json's; with `ep_group` only this
    rank's experts are read. A config announcing MTP layers whose weights are absent (HF saves no
    MTP) gives a model without MTP. Every model tensor must be found, or KeyError lists the missing."""
    from safetensors import safe_open

    directory = Path(path)
    config = json.loads((directory / "config.json").read_text())
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}.get(dtype)
        if dtype is None:
            raise ValueError("dtype must be float32, bfloat16 or float64")
    if dtype is not None:
        overrides["dtype"] = dtype
    args = ModelArgs.from_hf_config(config, **overrides)
    shards = _shards(directory)
    where: dict[str, Path] = {}
    for f in shards:
        with safe_open(str(f), framework="pt") as sf:
            where.update((n, f) for n in sf.keys())  # noqa: SIM118 (safe_open is not iterable)
    if args.n_mtp_layers and not any(n.startswith(f"model.layers.{args.n_layers}.") for n in where):
        args = args.replace(n_mtp_layers=0)

    with torch.device("meta"):
        model = Transformer(args, ep_group=ep_group)
    model = model.to_empty(device=device)
    model.reset_buffers()
    targets = _targets(model)
    filled: set[str] = set()
    with torch.no_grad():
        for name, (dst, _) in targets.items():
            if name not in where:
                continue
            with safe_open(str(where[name]), framework="pt", device="cpu") as sf:
                tensor = sf.get_tensor(name)
            if tensor.dtype == torch.float8_e4m3fn:
                scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
                if scale_name not in where:
                    raise KeyError(f"{name} is FP8 but {scale_name} is missing")
                with safe_open(str(where[scale_name]), framework="pt", device="cpu") as sf:
                    tensor = _dequantize(tensor, sf.get_tensor(scale_name))
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dst.shape)}")
            dst.copy_(tensor.to(dst.dtype))
            filled.add(name)
    # V2-style checkpoints have no selection bias: it stays zero.
    missing = sorted(n for n in set(targets) - filled if not n.endswith("e_score_correction_bias"))
    if missing:
        raise KeyError(f"checkpoint {directory} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    return model
