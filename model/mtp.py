"""Depth-1 multi-token prediction (DeepSeek-V3 report, section 2.2).

At position i the module combines the main model's last hidden state h_i with the embedding of
token i+1 and predicts token i+2 through the SHARED embedding and output head:
h'_i = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), then one transformer block, then its own
final norm (`shared_head.norm` in DeepSeek's checkpoints). The embedding comes first in the
concatenation, as in DeepSeek's released weights (`eh_proj` of shape [dim, 2*dim])."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.args import ModelArgs
from model.block import Block
from model.layers import RMSNorm
from model.precision import Linear


class MTPModule(nn.Module):
    def __init__(self, args: ModelArgs, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        dt = args.torch_dtype
        self.enorm = RMSNorm(args.dim, args.norm_eps, dt)
        self.hnorm = RMSNorm(args.dim, args.norm_eps, dt)
        self.eh_proj = Linear(2 * args.dim, args.dim, bias=False, dtype=dt)
        # MTP's block sits at layer index n_layers: a MoE layer whenever the model has any.
        self.block = Block(args.n_layers, args, ep_group)
        self.norm = RMSNorm(args.dim, args.norm_eps, dt)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """hidden [B, S', dim] (main trunk output at positions 0..S'-1, before the final norm),
        next_embeds [B, S', dim] (embeddings of tokens 1..S') -> normalised hidden [B, S', dim]
        for the shared head."""
        h = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return self.norm(self.block(h, freqs_cis))
