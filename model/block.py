"""One transformer layer: pre-norm MLA then pre-norm FFN (dense for the first n_dense_layers,
DeepSeekMoE after)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.args import ModelArgs
from model.layers import MLP, RMSNorm
from model.mla import MLA, MLACache
from model.moe import MoE


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, args.torch_dtype)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.torch_dtype)
        self.ffn: MLP | MoE = MLP(args.dim, args.inter_dim, args) if layer_id < args.n_dense_layers else MoE(args, ep_group)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: MLACache | None = None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs_cis, cache, start_pos)
        return x + self.ffn(self.ffn_norm(x))
