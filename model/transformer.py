"""The DeepSeek-V3 model: embedding -> n_layers Blocks (dense then MoE) -> RMSNorm -> head,
plus the depth-1 MTP module, the training loss and the aux-loss-free expert-bias update."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model import router
from model.args import ModelArgs
from model.block import Block
from model.layers import RMSNorm
from model.mla import MLACache
from model.moe import MoE
from model.mtp import MTPModule
from model.precision import Linear
from model.rope import precompute_freqs_cis

IGNORE_INDEX = -100


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for every matrix (linears, embedding, router, stacked experts), ones for
    norms; expert biases stay zero (they are buffers)."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("weight"):
                p.fill_(1.0)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over targets that are not IGNORE_INDEX, computed in float32 (float64 models: float64)."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.flatten(0, 1).to(work), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def update_expert_bias(layers: list[MoE], speed: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The bias update over some MoE layers (a whole model's or one pipeline stage's)."""
    if not layers:
        return torch.zeros(0)
    load = torch.stack([m.expert_load for m in layers])
    if group is not None:
        dist.all_reduce(load, group=group)
    for m, layer_load in zip(layers, load, strict=True):
        m.gate.expert_bias += router.bias_update(layer_load, speed).to(m.gate.expert_bias.dtype)
        m.expert_load.zero_()
    return load


class Transformer(nn.Module):
    """`forward(tokens [B, S] int64) -> logits [B, S, vocab]` (float32, float64 for float64
    models); `compute_loss(tokens, targets) -> (loss, metrics)`.

    With `ep_group`, every MoE layer holds only its EP rank's contiguous slice of routed experts
    and exchanges tokens over that group; everything else is replicated."""

    def __init__(self, args: ModelArgs, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.args = args
        dt = args.torch_dtype
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dt)
        self.layers = nn.ModuleList(Block(i, args, ep_group) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dt)
        self.head = Linear(args.dim, args.vocab_size, bias=False, dtype=dt)
        self.mtp = nn.ModuleList(MTPModule(args, ep_group) for _ in range(args.n_mtp_layers))
        self.register_buffer("freqs_cis", self._freqs(), persistent=False)
        init_weights(self)

    def _freqs(self) -> torch.Tensor:
        cdt = torch.complex128 if self.args.torch_dtype == torch.float64 else torch.complex64
        return precompute_freqs_cis(self.args).to(cdt)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recomputes the rope table and zeroes the expert biases and loads: needed after
        building on the meta device and `to_empty` (checkpoint loading)."""
        self.freqs_cis = self._freqs().to(self.embed.weight.device)
        for m in self.moe_layers():
            m.gate.expert_bias.zero_()
            m.expert_load.zero_()

    # ------------------------------------------------------------------ forward
    def _check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{name} must be an int64 tensor [batch, seq], got {got}")
        if tokens.size(1) > self.args.max_seq_len:
            raise ValueError(f"{name} has {tokens.size(1)} positions, more than max_seq_len={self.args.max_seq_len}")

    def trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding and all layers: the hidden state [B, S, dim] before the final norm."""
        self._check_tokens(tokens)
        h = self.embed(tokens)
        freqs = self.freqs_cis[: tokens.size(1)]
        for layer in self.layers:
            h = layer(h, freqs)
        return h

    def logits(self, hidden: torch.Tensor, apply_norm: bool = True) -> torch.Tensor:
        """The final norm (unless the hidden is already normalised, as MTP's is) and the output
        head (not FP8: the recipe keeps it high precision)."""
        out = self.head(self.norm(hidden) if apply_norm else hidden)
        return out if out.dtype == torch.float64 else out.float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.trunk(tokens))

    def mtp_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """MTP predictions for positions 0..S-2 (each predicts the token two ahead):
        [B, S-1, vocab]."""
        freqs = self.freqs_cis[: tokens.size(1) - 1]
        h = self.mtp[0](hidden[:, :-1], self.embed(tokens[:, 1:]), freqs)
        return self.logits(h, apply_norm=False)

    def compute_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """loss = CE(main) + mtp_loss_weight * CE(MTP) + sum of the MoE layers' sequence-wise
        balance losses. targets [B, S]: the token each position predicts (IGNORE_INDEX = -100 to
        skip one); MTP at position i predicts targets[:, i+1]."""
        self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        hidden = self.trunk(tokens)
        main = cross_entropy(self.logits(hidden), targets)
        loss = main
        metrics = {"main_loss": main.item()}
        if self.args.n_mtp_layers and tokens.size(1) > 1:
            mtp = cross_entropy(self.mtp_logits(hidden, tokens), targets[:, 1:])
            loss = loss + self.args.mtp_loss_weight * mtp
            metrics["mtp_loss"] = mtp.item()
        balance = [m.last_balance_loss for m in self.moe_layers() if m.last_balance_loss is not None]
        if balance:
            bal = torch.stack([b.to(loss.dtype) for b in balance]).sum()
            loss = loss + bal
            metrics["balance_loss"] = bal.item()
        metrics["loss"] = loss.item()
        return loss, metrics

    # ------------------------------------------------------------------ expert balance
    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, MTP's included, in a fixed order."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last bias update, on THIS process:
        [n_moe_layers, n_routed_experts] float64 (log max/mean from it)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.args.n_routed_experts, dtype=torch.float64)
        return torch.stack([m.expert_load for m in layers])

    def update_expert_bias(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Aux-loss-free balancing, once per optimizer step: sums the loads over `group` (the
        data-parallel group; None = this process only), moves every bias by
        bias_update_speed * sign(mean - load), resets the counts and returns the summed load
        [n_moe_layers, E] used."""
        return update_expert_bias(self.moe_layers(), self.args.bias_update_speed, group)

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch: int, max_len: int | None = None) -> list[MLACache]:
        max_len = self.args.max_seq_len if max_len is None else max_len
        dev = self.embed.weight.device
        return [MLACache.empty(self.args, batch, max_len, self.args.torch_dtype, dev) for _ in self.layers]

    @torch.no_grad()
    def forward_cached(self, tokens: torch.Tensor, cache: list[MLACache], start_pos: int) -> torch.Tensor:
        """Absorbed-MLA forward of tokens at positions start_pos.. with the latent cache:
        logits [B, S, vocab] (no MTP)."""
        self._check_tokens(tokens)
        end = start_pos + tokens.size(1)
        if end > cache[0].kv.size(1):
            raise ValueError(f"positions up to {end} exceed the cache length {cache[0].kv.size(1)}")
        h = self.embed(tokens)
        freqs = self.freqs_cis[start_pos:end]
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, freqs, c, start_pos)
        return self.logits(h)
