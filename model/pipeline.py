"""Pipeline-parallel stage modules for `dualpipe` (DualPipe, DualPipeV, 1F1B...).

Layers are split as evenly as possible (the first stages take the remainder); stage 0 holds the
embedding, the last stage the final norm, the head and the MTP module. Activations travel as
`(hidden [B, S, dim], tokens [B, S] int64)`: the last stage's MTP needs the tokens. The last stage
returns `(logits, mtp_logits)` (or `(logits,)` without MTP) for `StageCriterion`.

Each MoE layer's sequence-wise balance loss is attached to the hidden state with an identity
whose backward adds d(balance)/d(params) (`attach_aux_loss`), so its gradient flows wherever the
pipeline runs the backward, without a side channel to the loss."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from model.args import ModelArgs
from model.block import Block
from model.layers import RMSNorm
from model.moe import MoE
from model.mtp import MTPModule
from model.precision import Linear
from model.rope import precompute_freqs_cis
from model.transformer import cross_entropy, init_weights, update_expert_bias


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges per stage, sizes differing by at most one: the first
    n_layers % n_stages stages take one extra (61 over 16: thirteen stages of 4, three of 3)."""
    if not isinstance(n_stages, int) or n_stages <= 0:
        raise ValueError(f"n_stages must be a positive int, got {n_stages!r}")
    if n_stages > n_layers:
        raise ValueError(f"n_stages ({n_stages}) exceeds n_layers ({n_layers}): a stage without layers is not allowed")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _high(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 (float64 models keep float64), as `Transformer.logits`."""
    return logits if logits.dtype == torch.float64 else logits.float()


class _AttachAux(torch.autograd.Function):
    """Identity on x; its backward also starts a backward of `aux` with gradient 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """x, with `aux`'s gradient riding on x's backward (DeepSeek-V2's AddAuxiliaryLoss idea)."""
    if aux is None or not aux.requires_grad or not torch.is_grad_enabled():
        return x
    return _AttachAux.apply(x, aux)


class PipelineStage(nn.Module):
    """One pipeline stage of the DeepSeek-V3 model. Parameter names follow `Transformer`'s
    (`layers.{global id}.*`, `embed`, `norm`, `head`, `mtp.0.*`), so a full state dict loads into
    the stages with `strict=False`.

    On the last stage with MTP, `mtp_embed` is the embedding MTP uses: pass stage 0's
    `embed` when both stages live on one rank (DualPipe/DualPipeV place them together on rank 0);
    otherwise the stage holds its own copy and the trainer must keep it tied (sum its gradient
    with stage 0's embedding gradient)."""

    def __init__(self, args: ModelArgs, stage: int, n_stages: int, ep_group: dist.ProcessGroup | None = None,
                 mtp_embed: nn.Embedding | None = None) -> None:
        super().__init__()
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage must be in [0, {n_stages}), got {stage}")
        self.args = args
        self.stage, self.n_stages = stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.layer_ids = split_layers(args.n_layers, n_stages)[stage]
        dt = args.torch_dtype
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dt) if self.is_first else None
        self.layers = nn.ModuleDict({str(i): Block(i, args, ep_group) for i in self.layer_ids})
        self.norm = RMSNorm(args.dim, args.norm_eps, dt) if self.is_last else None
        self.head = Linear(args.dim, args.vocab_size, bias=False, dtype=dt) if self.is_last else None
        use_mtp = self.is_last and args.n_mtp_layers > 0
        self.mtp = nn.ModuleList([MTPModule(args, ep_group)]) if use_mtp else None
        init_weights(self)
        self.mtp_embed = None
        if use_mtp:
            self.mtp_embed = mtp_embed if mtp_embed is not None else nn.Embedding(args.vocab_size, args.dim, dtype=dt)
            if mtp_embed is None:
                init_weights(self.mtp_embed)
        cdt = torch.complex128 if dt == torch.float64 else torch.complex64
        self.register_buffer("freqs_cis", precompute_freqs_cis(args).to(cdt), persistent=False)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_expert_bias(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """`Transformer.update_expert_bias` for this stage's MoE layers (group: the DP group of
        this stage's replicas)."""
        return update_expert_bias(self.moe_layers(), self.args.bias_update_speed, group)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stage 0: (tokens,); later stages: (hidden, tokens). Returns (hidden, tokens), or on the
        last stage (logits, mtp_logits) / (logits,)."""
        if self.is_first:
            (tokens,) = inputs
            h = self.embed(tokens)
        else:
            h, tokens = inputs
        freqs = self.freqs_cis[: tokens.size(1)]
        for layer in self.layers.values():
            h = layer(h, freqs)
            if layer.is_moe:
                h = attach_aux_loss(h, layer.ffn.last_balance_loss)
        if not self.is_last:
            return h, tokens
        logits = _high(self.head(self.norm(h)))
        if self.mtp is None:
            return (logits,)
        mtp_h = self.mtp[0](h[:, :-1], self.mtp_embed(tokens[:, 1:]), self.freqs_cis[: tokens.size(1) - 1])
        mtp_h = attach_aux_loss(mtp_h, self.mtp[0].block.ffn.last_balance_loss if self.mtp[0].block.is_moe else None)
        return logits, _high(self.head(mtp_h))

    @staticmethod
    def overlapped_forward_backward(m0: PipelineStage, inputs0: Sequence[torch.Tensor], criterion0, labels0,
                                    m1: PipelineStage, loss1: torch.Tensor | None, outputs1, output_grads1):
        """dualpipe's F&B hook: one chunk's forward on m0 and another chunk's backward on m1,
        overlapped.

        The backward runs on a second thread while this thread runs the forward. Each side's
        dispatch/combine waits (and gloo/NCCL transfers, which release the GIL) then overlap the
        other side's compute, DeepSeek-V3's F&B pairing. That is safe only when the two sides
        share no process group: each thread issues its own collectives in the schedule's order
        (identical on every rank), but the interleaving BETWEEN the threads differs from rank
        to rank, so on one shared group the ranks would pair up different collectives. Hence
        the overlap needs m0 and m1 built with different EP group objects (two
        `dist.new_group` calls over the same ranks, one per stage module of a rank); with one
        shared group, or without EP (nothing to overlap), the forward runs, then the backward.

        Why a thread, not an interleaving by hand: the backward of m1 is one autograd-engine run
        (loss.backward()), which cannot be paused at a layer boundary to run a piece of m0's
        forward; interleaving on one thread would need every layer's graph cut at its
        dispatch/combine (detached segments, backward run segment by segment), a different
        stage structure. The inputs of m1 are detached leaves (dualpipe's executor detaches
        stage boundaries), so m1's backward never enters m0's graph."""
        from dualpipe.executor import run_backward

        def backward() -> None:
            if loss1 is not None:
                loss1.backward()
            else:
                run_backward(list(outputs1), list(output_grads1))

        def forward():
            outputs0 = m0(*inputs0)
            return outputs0, (criterion0(*outputs0, *labels0) if criterion0 is not None else None)

        if not can_overlap(m0, m1):
            result = forward()
            backward()
            return result
        errors: list[BaseException] = []

        def run() -> None:
            try:
                backward()
            except BaseException as e:  # re-raised on the calling thread
                errors.append(e)

        worker = threading.Thread(target=run, name="dsv3-overlapped-backward")
        worker.start()
        try:
            result = forward()
        finally:
            worker.join()
        if errors:
            raise errors[0]
        return result


def _ep_groups(m: nn.Module) -> set[int]:
    return {id(moe.ep_group) for moe in m.modules() if isinstance(moe, MoE) and moe.ep_group is not None}


def can_overlap(m0: nn.Module, m1: nn.Module) -> bool:
    """Whether `overlapped_forward_backward` runs m1's backward concurrently with m0's forward:
    both are distinct modules with expert-parallel MoE layers, and they share no EP group."""
    g0, g1 = _ep_groups(m0), _ep_groups(m1)
    return m0 is not m1 and bool(g0) and bool(g1) and not (g0 & g1)


class StageCriterion:
    """The last stage's loss: CE(logits, targets) + mtp_loss_weight * CE(mtp_logits, targets[:, 1:]).
    The balance losses are not added to the value: their gradients ride on the activations."""

    def __init__(self, args: ModelArgs) -> None:
        self.mtp_loss_weight = args.mtp_loss_weight

    def __call__(self, logits: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if len(rest) == 2:
            mtp_logits, targets = rest
            return cross_entropy(logits, targets) + self.mtp_loss_weight * cross_entropy(mtp_logits, targets[:, 1:])
        (targets,) = rest
        return cross_entropy(logits, targets)


def build_stage(args: ModelArgs, stage: int, n_stages: int, ep_group: dist.ProcessGroup | None = None,
                mtp_embed: nn.Embedding | None = None) -> PipelineStage:
    """The module of `stage` out of `n_stages` (see `PipelineStage`)."""
    return PipelineStage(args, stage, n_stages, ep_group, mtp_embed)
