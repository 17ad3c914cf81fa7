"""Multi-head latent attention (DeepSeek-V2/V3): the training form through
scaled_dot_product_attention, and the absorbed inference form over a compressed latent cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.attention import causal_mla_attention
from model.layers import RMSNorm, make_linear
from model.precision import bf16_matmul_upcast, sdpa
from model.rope import apply_rotary_emb


def _pad_v(x: torch.Tensor) -> bool:
    """Whether to pad v to the qk head dim so SDPA takes its flash kernel (which needs equal head
    dims) rather than the math path that materialises [S, S] scores. Measured on the CPU here:
    1.6x faster in float32, but 3.5x slower in native bfloat16 (no AVX-512-BF16/AMX); bfloat16
    that attends in FP32 (model.precision) pads like float32."""
    return x.is_cuda or x.dtype != torch.bfloat16 or bf16_matmul_upcast(x.device)


def _chunked_attention(x: torch.Tensor) -> bool:
    """Whether the training form attends with model.attention (query chunks, shared rope key)
    rather than scaled_dot_product_attention: on CPUs whenever attention runs in float32 or
    float64 (which BF16 does on CPUs without BF16 matmul hardware, model.precision). Measured
    on this Zen 3 CPU (one debug-preset layer, S=512, 2 threads): forward+backward 49 ms against
    99 ms for the flash kernel with padded v (fastest of 9). CUDA keeps SDPA's fused kernels; BF16 on
    CPUs with AMX/AVX512-BF16 keeps SDPA's BF16 flash kernel."""
    if x.device.type != "cpu":
        return False
    return x.dtype in (torch.float32, torch.float64) or (x.dtype == torch.bfloat16 and bf16_matmul_upcast(x.device))


@dataclass
class MLACache:
    """Per-layer inference cache: the normalised latent and the shared rope key of each position.
    kv [B, max_len, kv_lora_rank], pe [B, max_len, qk_rope_head_dim]: (C + R) numbers per token
    instead of H * (Dqk + Dv)."""

    kv: torch.Tensor
    pe: torch.Tensor

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> MLACache:
        return cls(
            kv=torch.zeros(batch, max_len, args.kv_lora_rank, dtype=dtype, device=device),
            pe=torch.zeros(batch, max_len, args.qk_rope_head_dim, dtype=dtype, device=device),
        )


class MLA(nn.Module):
    """q: dim -> q_lora_rank (RMSNorm) -> H*(nope+rope), or dim -> H*(nope+rope) when q_lora_rank is 0.
    kv: dim -> kv_lora_rank + rope; the rope part is one key head shared by all heads; the latent
    is RMSNorm'd then expanded to H*(nope+v) and split into k_nope and v."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale
        dt = args.torch_dtype
        if self.q_lora_rank == 0:
            self.wq = make_linear(args.dim, self.n_heads * self.qk_head_dim, args)
        else:
            self.wq_a = make_linear(args.dim, self.q_lora_rank, args)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps, dt)
            self.wq_b = make_linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, args)
        self.wkv_a = make_linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, args)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps, dt)
        self.wkv_b = make_linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), args)
        self.wo = make_linear(self.n_heads * self.v_head_dim, args.dim, args)

    def _queries(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.n_heads, self.qk_head_dim)  # [B, S, H, Dqk]
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary_emb(q_pe, freqs_cis)

    def _latent(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised latent [B, S, C] and rotated shared rope key [B, S, R]."""
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)
        return self.kv_norm(kv), k_pe

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: MLACache | None = None, start_pos: int = 0) -> torch.Tensor:
        """x [B, S, dim]; freqs_cis [S, R/2] for positions start_pos..start_pos+S-1. Without a
        cache: the causal training form. With one: the absorbed form, writing this chunk's latent
        into the cache at start_pos and attending to everything cached up to it."""
        if cache is not None:
            return self._absorbed(x, freqs_cis, cache, start_pos)
        bsz, seqlen, _ = x.shape
        q_nope, q_pe = self._queries(x, freqs_cis)
        kv, k_pe = self._latent(x, freqs_cis)
        kv = self.wkv_b(kv).view(bsz, seqlen, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if _chunked_attention(x):  # [B, S, H, Dv]
            out = causal_mla_attention(q_nope, q_pe, k_nope, k_pe, v, self.softmax_scale)
            return self.wo(out.flatten(2))
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, Dqk]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        pad = self.qk_head_dim - self.v_head_dim if _pad_v(x) else 0
        if pad > 0:  # zero columns: the result is unchanged, and the flash kernel accepts equal dims
            v = F.pad(v, (0, pad))
        out = sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )  # [B, H, S, Dqk or Dv]
        if pad > 0:
            out = out[..., : self.v_head_dim]
        return self.wo(out.transpose(1, 2).flatten(2))

    def _absorbed(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: MLACache, start_pos: int) -> torch.Tensor:
        """Folds wkv_b's k_nope rows into the query and its v rows into the output, so attention
        runs on the cached latent directly (DeepSeek-V3 inference)."""
        bsz, seqlen, _ = x.shape
        end = start_pos + seqlen
        q_nope, q_pe = self._queries(x, freqs_cis)
        kv, k_pe = self._latent(x, freqs_cis)
        cache.kv[:bsz, start_pos:end] = kv.to(cache.kv.dtype)
        cache.pe[:bsz, start_pos:end] = k_pe.to(cache.pe.dtype)
        wkv_b = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = wkv_b[:, : self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim :]  # [H, nope, C], [H, v, C]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk.to(q_nope.dtype))  # [B, S, H, C]
        kv_all, pe_all = cache.kv[:bsz, :end].to(x.dtype), cache.pe[:bsz, :end].to(x.dtype)
        scores = torch.einsum("bshc,btc->bsht", q_lat, kv_all) + torch.einsum("bshr,btr->bsht", q_pe, pe_all)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        scores = scores.to(work) * self.softmax_scale
        q_pos = torch.arange(start_pos, end, device=x.device).view(1, seqlen, 1, 1)
        k_pos = torch.arange(end, device=x.device).view(1, 1, 1, end)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf")).softmax(dim=-1).to(x.dtype)
        out = torch.einsum("bsht,btc->bshc", scores, kv_all)
        out = torch.einsum("bshc,hdc->bshd", out, w_uv.to(out.dtype))  # [B, S, H, Dv]
        return self.wo(out.flatten(2))
