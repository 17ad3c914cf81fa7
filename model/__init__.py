"""The reference DeepSeek-V3 model: `ModelArgs` (+ presets), `Transformer` (MLA with YaRN,
DeepSeekMoE with aux-loss-free routing, depth-1 MTP), FLOPs/parameter accounting, HF checkpoint
interop, generation and pipeline stage modules. See /work/notes/model_api.md or README."""

from model.args import ModelArgs
from model.flops import count_params, flops_per_token
from model.transformer import IGNORE_INDEX, Transformer

__all__ = ["IGNORE_INDEX", "ModelArgs", "Transformer", "count_params", "flops_per_token"]
