"""Autoregressive sampling with the absorbed-MLA latent cache (prefill once, then one token per
step), and the same loop without a cache (full recompute each step) for checking it."""

from __future__ import annotations

import torch

from model.transformer import Transformer


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """tokens [B, S0] int64 prompt (all the same length) -> [B, S0 + max_new_tokens].
    With use_cache, the prompt is prefilled into the latent cache and each new token costs one
    position of attention; without, every step reruns the full training-form forward."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    total = tokens.size(1) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={model.args.max_seq_len}")
    out = tokens
    if max_new_tokens == 0:
        return out
    if use_cache:
        cache = model.new_cache(tokens.size(0), total)
        logits = model.forward_cached(tokens, cache, 0)[:, -1]
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if out.size(1) == total:
                break
            logits = model.forward_cached(nxt[:, None], cache, out.size(1) - 1)[:, -1]
    else:
        for _ in range(max_new_tokens):
            nxt = sample(model(out)[:, -1], temperature, top_k, generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
    return out
