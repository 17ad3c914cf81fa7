"""Expert parallelism for `MoE`: routed experts sharded contiguously over the EP group, tokens
moved with `comm.all_to_all` (DeepEP's semantics: a token goes to each rank holding any of its
experts once; combine sums the ranks' weighted partial outputs in FP32).

One MoE forward under EP, as DeepSeek-V3 runs it (ARCHITECTURE.md "One training step"):

1. start the dispatch asynchronously; its payload is FP8 (1x128 tiles, `ops.per_token_cast_to_fp8`)
   when `args.fp8` is on, the activations' own dtype otherwise;
2. compute the shared experts while the tokens are in flight;
3. wait, dequantize the received FP8 rows, run the local experts;
4. combine in the activations' dtype (the sum itself is FP32 inside comm).

Autograd: the dispatch is started outside autograd (the payload may be FP8, which has no
gradient), and `_Dispatched` attaches the received rows to the graph afterwards. Its backward is
the dispatch's adjoint: a combine of the received rows' gradients in high precision (BF16/FP32,
never FP8: straight-through for the payload quantization, as the recipe's FP8 dispatch does),
which also sums the gradients of the top-k weights. The combine's backward is comm's
differentiable combine (a dispatch of the gradient along the same handle). Every rank runs the
same collectives in the same order, forward and backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from comm.all_to_all import Buffer
    from comm.layout import DispatchHandle
    from model.moe import MoE


def _ep_dtypes() -> tuple[torch.dtype, ...]:
    """The model dtypes expert parallel runs in: those of comm.all_to_all's FLOAT_DTYPES a model uses."""
    from comm.all_to_all import FLOAT_DTYPES

    return tuple(d for d in (torch.float32, torch.bfloat16, torch.float64) if d in FLOAT_DTYPES)


def _buffer(moe: MoE) -> Buffer:
    from comm.all_to_all import Buffer

    buf = getattr(moe, "_ep_buffer", None)
    if buf is None:
        buf = Buffer(moe.ep_group)
        moe._ep_buffer = buf
    return buf


class _Dispatched(torch.autograd.Function):
    """Connects rows received by an already finished dispatch to the graph of the tensors that
    were sent. forward(x, topk_weights, box) -> box's (recv_x, recv_topk_weights); backward: the
    combine of their gradients along the dispatch's handle (the weights' gradients either as
    combine's float32 topk_weights, or, when they rode in the payload, as extra payload columns)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_weights: torch.Tensor, box: dict):
        ctx.buffer, ctx.handle, ctx.x_dtype, ctx.packed = box["buffer"], box["handle"], x.dtype, box["packed"]
        ctx.w_dtype = topk_weights.dtype
        recv_idx = box["recv_idx"]
        ctx.save_for_backward(recv_idx)
        return box["recv_x"], box["recv_w"]

    @staticmethod
    def backward(ctx, grad_recv_x: torch.Tensor | None, grad_recv_w: torch.Tensor | None):
        (recv_idx,) = ctx.saved_tensors
        handle: DispatchHandle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((handle.num_recv_tokens, 1), dtype=ctx.x_dtype, device=recv_idx.device)
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(recv_idx.shape, dtype=ctx.w_dtype, device=recv_idx.device)
        # slots whose expert lives elsewhere were constant zeros: no gradient flows back from them
        grad_recv_w = grad_recv_w.to(ctx.w_dtype).masked_fill(recv_idx < 0, 0.0)
        grad_recv_x = grad_recv_x.to(ctx.x_dtype)
        if ctx.packed:
            both, _, _ = ctx.buffer.combine(torch.cat([grad_recv_x, grad_recv_w], dim=1), handle)
            grad_x, grad_w = both.split([both.shape[1] - grad_recv_w.shape[1], grad_recv_w.shape[1]], dim=1)
            return grad_x, grad_w, None
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), handle, topk_weights=grad_recv_w.contiguous())
        return grad_x.to(ctx.x_dtype), grad_w, None


def moe_ep_forward(moe: MoE, x: torch.Tensor, weights: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """x [T, dim], weights [T, k] (fp32, fp64 for fp64 models), topk_idx [T, k] GLOBAL expert ids
    -> routed + shared output [T, dim]. Every rank of the group must call it (dispatch and
    combine are collectives, forward and backward)."""
    from comm.all_to_all import combine

    if x.dtype not in _ep_dtypes():
        names = ", ".join(str(d).removeprefix("torch.") for d in _ep_dtypes())
        raise TypeError(f"expert parallel runs in {names} (comm.all_to_all's dtypes), got {x.dtype}")
    buf = _buffer(moe)
    # DeepEP carries top-k weights as float32; a float64 model's weights ride in the payload
    # instead (k extra columns), so that nothing on the way is rounded to float32
    packed = x.dtype == torch.float64 and not moe.args.fp8
    k = weights.shape[1]
    with torch.no_grad():
        if moe.args.fp8:
            from ops import per_token_cast_to_fp8

            payload = per_token_cast_to_fp8(x.detach())  # (x_fp8 [T, dim], scales [T, ceil(dim/128)])
        elif packed:
            payload = torch.cat([x.detach(), weights.detach().to(x.dtype)], dim=1)  # [T, dim + k]
        else:
            payload = x.detach()
        recv, recv_idx, recv_w, _, handle, event = buf.dispatch(
            payload, topk_idx=topk_idx, topk_weights=weights.detach().float().contiguous(),
            num_experts=moe.n_experts, async_finish=True)
    shared = moe.shared_experts(x) if moe.shared_experts is not None else None  # while tokens travel
    event.current_stream_wait()
    if isinstance(recv, tuple):  # each 1x128 tile times its scale, in fp32
        from ops.reference import dequantize_tiles_reference

        recv_x = dequantize_tiles_reference(*recv, 1, 128, torch.float32).to(x.dtype)
    elif packed:
        recv_x, recv_w = recv[:, :-k], recv[:, -k:].masked_fill(recv_idx < 0, 0.0)
    else:
        recv_x = recv
    box = {"buffer": buf, "handle": handle, "recv_x": recv_x, "recv_w": recv_w, "recv_idx": recv_idx, "packed": packed}
    recv_x, recv_w = _Dispatched.apply(x, weights if packed else weights.float(), box)
    # recv_idx is local to this rank (-1: expert elsewhere, weight 0 there)
    y = combine(buf, moe.routed_local(recv_x, recv_w, recv_idx), handle)
    return y if shared is None else y + shared


def shard_state_dict(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict cut down to what `model` holds: each MoE's stacked expert
    tensors `...experts.w{1,2,3}` keep only this EP rank's contiguous rows; keys the model lacks
    (e.g. other pipeline stages' layers) are dropped."""
    from model.moe import MoE

    own = model.state_dict()
    starts = {name + ".experts.": m for name, m in model.named_modules() if isinstance(m, MoE)}
    out = {}
    for key, value in full.items():
        if key not in own:
            continue
        for prefix, m in starts.items():
            if key.startswith(prefix):
                value = value[m.expert_start : m.expert_start + m.n_local]
                break
        out[key] = value
    return out
