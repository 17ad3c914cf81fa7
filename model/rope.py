"""Rotary embeddings with DeepSeek's YaRN frequency correction, on interleaved pairs.

DeepSeek's weights store each rotated pair as adjacent channels (x[2i], x[2i+1]) (HF calls this
`rope_interleave=True`), so the rotation is a complex multiply on a view of those pairs."""

from __future__ import annotations

import math

import torch

from model.args import ModelArgs


def _correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """The rotary dimension whose wavelength completes `num_rotations` turns over max_seq_len."""
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, max_seq_len: int) -> tuple[int, int]:
    low = math.floor(_correction_dim(beta_fast, dim, base, max_seq_len))
    high = math.ceil(_correction_dim(beta_slow, dim, base, max_seq_len))
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(low: float, high: float, n: int) -> torch.Tensor:
    if low == high:
        high += 0.001
    return ((torch.arange(n, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [qk_rope_head_dim/2] in float64. With YaRN active, high-frequency
    dimensions keep their frequency (extrapolate), low-frequency ones are divided by rope_factor
    (interpolate), with a linear ramp between beta_fast and beta_slow rotations."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if args.yarn_active:
        low, high = _correction_range(args.beta_fast, args.beta_slow, dim, base, args.original_seq_len)
        smooth = 1 - _linear_ramp(low, high, dim // 2)
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def precompute_freqs_cis(args: ModelArgs, seq_len: int | None = None) -> torch.Tensor:
    """Complex rotations [seq_len, qk_rope_head_dim/2] (complex128) for positions 0..seq_len-1."""
    seq_len = args.max_seq_len if seq_len is None else seq_len
    t = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(t, rope_frequencies(args))
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs of the last dim. x [B, S, H, D]; freqs_cis [S, D/2] complex.
    Computed in float32 (float64 for float64 inputs), returned in x's dtype."""
    dtype = x.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    xc = torch.view_as_complex(x.to(work).reshape(*x.shape[:-1], -1, 2))  # [B, S, H, D/2]
    rot = freqs_cis.to(xc.dtype).view(1, xc.size(1), 1, xc.size(-1))
    return torch.view_as_real(xc * rot).flatten(-2).to(dtype)
