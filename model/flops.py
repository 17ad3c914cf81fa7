"""Parameter and FLOPs accounting (shared/REFERENCE.md "Training and MFU accounting").

flops_per_token = 6 * (active non-embedding parameters, output head included)
                + 6 * n_layers * n_heads * (qk_nope + qk_rope + v) * seq_len
The attention term is NOT discounted for the causal mask (torchtitan's convention); pass
`causal_discount=True` for the halved variant other trainers use. MTP counts when enabled: its
block, eh_proj and a second pass through the shared head, plus one more attention term."""

from __future__ import annotations

from model.args import ModelArgs


def _mla_params(a: ModelArgs) -> int:
    q = a.dim * a.n_heads * a.qk_head_dim if a.q_lora_rank == 0 else (
        a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.n_heads * a.qk_head_dim
    )
    kv = a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.n_heads * a.v_head_dim * a.dim


def _layer_params(a: ModelArgs, moe: bool) -> tuple[int, int]:
    """(total, active) of one layer, norms included."""
    attn = _mla_params(a) + 2 * a.dim
    if not moe:
        ffn = 3 * a.dim * a.inter_dim
        return attn + ffn, attn + ffn
    expert = 3 * a.dim * a.moe_inter_dim
    shared = a.n_shared_experts * expert
    gate = a.n_routed_experts * a.dim
    total = attn + gate + shared + a.n_routed_experts * expert
    active = attn + gate + shared + a.n_activated_experts * expert
    return total, active


def count_params(args: ModelArgs, *, include_embedding: bool = True) -> tuple[int, int]:
    """(total, active per token) parameters as built by `Transformer(args)`: embedding and head
    are separate (untied), the MTP module shares them. For the 671B preset without MTP:
    about 671.0B total, 37.5B active (REFERENCE.md)."""
    a = args
    total = active = 0
    for i in range(a.n_layers):
        t, ac = _layer_params(a, moe=i >= a.n_dense_layers)
        total, active = total + t, active + ac
    total += a.dim + a.dim * a.vocab_size  # final norm + head
    active += a.dim + a.dim * a.vocab_size
    if include_embedding:
        total += a.vocab_size * a.dim
        active += a.vocab_size * a.dim
    for _ in range(a.n_mtp_layers):
        t, ac = _layer_params(a, moe=a.n_layers >= a.n_dense_layers)
        extra = 3 * a.dim + 2 * a.dim * a.dim  # enorm, hnorm, final norm, eh_proj
        total, active = total + t + extra, active + ac + extra
    return total, active


def flops_per_token(args: ModelArgs, seq_len: int, *, causal_discount: bool = False) -> float:
    """Training FLOPs (forward + backward) per token at this sequence length."""
    a = args
    _, active = count_params(a, include_embedding=False)
    if a.n_mtp_layers:
        active += a.n_mtp_layers * a.dim * a.vocab_size  # the shared head runs once more per MTP depth
    n_attn_layers = a.n_layers + a.n_mtp_layers
    attn = 6 * n_attn_layers * a.n_heads * (a.qk_head_dim + a.v_head_dim) * seq_len
    if causal_discount:
        attn /= 2
    return 6.0 * active + attn
