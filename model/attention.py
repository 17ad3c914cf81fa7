"""Causal MLA attention for CPUs, in query chunks, with the shared rope key kept unexpanded.

Why not `scaled_dot_product_attention` here: on CPUs torch's flash kernel needs equal q and v head
dims (MLA has 192 and 128, so v is padded with zeros), splits queries into blocks of 64 but keys
into blocks of 512, so at the sequence lengths CPU runs train at it skips no masked block, and its
backward recomputes the scores in small GEMMs. Measured on this CPU (Zen 3, debug preset, S=512):
its backward took ~36% of the model's training step. The math path (HF's, since the dims differ)
multiplies the full [S, S] score matrix. This module computes what a blocked causal kernel would,
with GEMMs large enough for MKL:

- queries in chunks of `chunk` rows; chunk i attends to keys [0, end_i) only, so about
  (n + 1) / (2n) of the full score matrix is computed for n chunks (62% at S=512, chunk 128);
  only the diagonal block is masked;
- the scores are q_nope k_nope^T + q_pe k_pe^T, where k_pe is MLA's single rope key shared by all
  heads: the second product is ONE GEMM of [H * c, R] by [R, e] per chunk, and k_pe is never
  expanded to H heads or concatenated into k (its gradient is one GEMM too);
- inputs stay in the [B, S, H, D] layout the projections produce (strided GEMM operands, no
  transposed copies);
- backward reuses the saved probabilities when they fit `SAVED_PROBS_BUDGET` bytes, else it
  recomputes them from the saved log-sum-exp (one more GEMM per chunk, memory O(S)); dK and dV
  accumulate per key chunk in contiguous blocks, so every update is one batched GEMM.

Few, large ops matter on a shared 2-core machine too: every op is a parallel region whose threads
wait for each other, and a descheduled thread stalls the whole op. Measured 2026-11-29 (debug
preset, S=512, 2 threads, interleaved runs, fastest of 6): the model's forward+backward 954 ms
against 1159 ms through SDPA's flash kernel; the attention alone (one layer's shapes) 49 ms
against 99 ms, medians 61 against 104 ms.

Arithmetic is float32 (float64 for float64 inputs); BF16 inputs are computed in float32 and the
output rounded once (the arithmetic of a BF16 tensor core; see model/precision.py).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# query rows per chunk: at S=512 (debug preset, one thread) 64 and 128 measured equal, 256 and 512
# 10-35% slower (less causal skipping); 128 issues half the ops of 64
CHUNK = 128
SAVED_PROBS_BUDGET = 64 * 2**20  # bytes of probabilities one call may keep for backward


def _probs_bytes(batch: int, heads: int, seq: int, chunk: int, itemsize: int) -> int:
    """Bytes of the causal chunks' probabilities: sum over chunks of rows * keys attended."""
    total = sum((min(s0 + chunk, seq) - s0) * min(s0 + chunk, seq) for s0 in range(0, seq, chunk))
    return batch * heads * total * itemsize


def _scores(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
            b: int, s0: int, e: int, scale: float, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled, causally masked scores of queries s0..e-1 of batch b against keys 0..e-1:
    [H, c, e], and the chunk's rope queries flattened to [H * c, R] (backward needs them)."""
    c, heads = e - s0, q_nope.size(2)
    qn = q_nope[b, s0:e].transpose(0, 1)  # [H, c, Dn]
    kn = k_nope[b, :e].permute(1, 2, 0)  # [H, Dn, e]
    scores = torch.baddbmm(qn.new_empty(heads, c, e), qn, kn, beta=0, alpha=scale)  # [H, c, e]
    qp = q_pe[b, s0:e].transpose(0, 1).reshape(heads * c, -1)  # [H * c, R]
    scores.view(heads * c, e).addmm_(qp, k_pe[b, :e].t(), alpha=scale)  # the shared rope key: one GEMM
    scores[:, :, s0:e].masked_fill_(upper[:c, :c], float("-inf"))  # [c, c] diagonal block
    return scores, qp


class _ChunkedCausalAttention(torch.autograd.Function):
    """out[b, s, h] = softmax_t<=s(scale * (q_nope.k_nope + q_pe.k_pe)) @ v over [B, S, H, D]
    tensors of one floating dtype; k_pe [B, S, R] is shared by the heads."""

    @staticmethod
    def forward(ctx, q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                v: torch.Tensor, scale: float, chunk: int, save_probs: bool) -> torch.Tensor:
        bsz, seqlen, heads, _ = q_nope.shape
        out = v.new_empty(bsz, seqlen, heads, v.size(-1))
        lse = None if save_probs else q_nope.new_empty(bsz, heads, seqlen)
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q_nope.device).triu_(1)
        probs = []
        for b in range(bsz):
            for s0 in range(0, seqlen, chunk):
                e = min(s0 + chunk, seqlen)
                p, _ = _scores(q_nope, q_pe, k_nope, k_pe, b, s0, e, scale, upper)
                if save_probs:
                    p = torch.softmax(p, dim=-1)
                    probs.append(p)
                else:
                    m = torch.logsumexp(p, dim=-1, keepdim=True)  # [H, c, 1]
                    lse[b, :, s0:e] = m.squeeze(-1)
                    p = p.sub_(m).exp_()
                out[b, s0:e] = torch.bmm(p, v[b, :e].transpose(0, 1)).transpose(0, 1)  # [c, H, Dv]
        # saved through autograd (not on ctx) so a retained graph can run backward again
        ctx.save_for_backward(q_nope, q_pe, k_nope, k_pe, v, out, *(probs if save_probs else [lse]))
        ctx.save_probs, ctx.scale, ctx.chunk = save_probs, scale, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q_nope, q_pe, k_nope, k_pe, v, out, *saved = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        probs, lse = (saved, None) if ctx.save_probs else (None, saved[0])
        bsz, seqlen, heads, _ = q_nope.shape
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)  # [B, S, H]: rowsum(dO * O) = rowsum(P * dP)
        dq_nope, dq_pe = torch.empty_like(q_nope), torch.empty_like(q_pe)
        dk_pe = torch.zeros_like(k_pe)
        # dK_nope and dV accumulate per key chunk in contiguous [H, chunk, D] blocks, so each
        # update is one batched GEMM (a baddbmm_ into a strided [e, H, D] slice of a [B, S, H, D]
        # gradient falls back to one small GEMM per head: 16x the calls)
        n_chunks = -(-seqlen // chunk)
        dk_acc = q_nope.new_zeros(bsz, n_chunks, heads, chunk, k_nope.size(-1))
        dv_acc = v.new_zeros(bsz, n_chunks, heads, chunk, v.size(-1))
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q_nope.device).triu_(1)
        i = 0
        for b in range(bsz):
            for s0 in range(0, seqlen, chunk):
                e = min(s0 + chunk, seqlen)
                c = e - s0
                if probs:
                    p = probs[i]
                    qp = q_pe[b, s0:e].transpose(0, 1).reshape(heads * c, -1)
                else:
                    p, qp = _scores(q_nope, q_pe, k_nope, k_pe, b, s0, e, scale, upper)
                    p = p.sub_(lse[b, :, s0:e].unsqueeze(-1)).exp_()
                i += 1
                go = grad_out[b, s0:e].transpose(0, 1)  # [H, c, Dv]
                ds = torch.bmm(go, v[b, :e].permute(1, 2, 0))  # dP [H, c, e]
                ds = ds.sub_(delta[b, s0:e].t().unsqueeze(-1)).mul_(p)  # dS = P * (dP - delta)
                dq_nope[b, s0:e] = torch.bmm(ds, k_nope[b, :e].transpose(0, 1)).transpose(0, 1)
                qn = q_nope[b, s0:e].transpose(0, 1)  # [H, c, Dn]
                for j, k0 in enumerate(range(0, e, chunk)):  # key chunks 0..i
                    k1 = min(k0 + chunk, e)
                    dv_acc[b, j, :, : k1 - k0].baddbmm_(p[:, :, k0:k1].transpose(1, 2), go)
                    dk_acc[b, j, :, : k1 - k0].baddbmm_(ds[:, :, k0:k1].transpose(1, 2), qn)
                flat = ds.view(heads * c, e)
                dq_pe[b, s0:e] = (flat @ k_pe[b, :e]).view(heads, c, -1).transpose(0, 1)
                dk_pe[b, :e].addmm_(flat.t(), qp)  # summed over heads: the key is shared
        dk_nope = dk_acc.transpose(2, 3).reshape(bsz, n_chunks * chunk, heads, -1)[:, :seqlen]  # [B, S, H, Dn]
        dv = dv_acc.transpose(2, 3).reshape(bsz, n_chunks * chunk, heads, -1)[:, :seqlen]
        for g in (dq_nope, dq_pe, dk_nope, dk_pe):
            g.mul_(scale)
        return dq_nope, dq_pe, dk_nope, dk_pe, dv, None, None, None


def causal_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                         v: torch.Tensor, scale: float, *, chunk: int = CHUNK,
                         save_probs: bool | None = None) -> torch.Tensor:
    """Causal attention of MLA's training form.

    q_nope [B, S, H, Dn], q_pe [B, S, H, R] (rotated), k_nope [B, S, H, Dn], k_pe [B, S, R]
    (rotated, one key shared by all heads), v [B, S, H, Dv]; any strides with a unit last-dim
    stride. Returns [B, S, H, Dv] in q_nope's dtype, equal to scaled_dot_product_attention of
    q = [q_nope, q_pe], k = [k_nope, k_pe expanded to H heads], v with is_causal=True.
    `save_probs=None` keeps the probabilities for backward when they fit SAVED_PROBS_BUDGET."""
    bsz, seqlen, heads, dn = q_nope.shape
    rope = q_pe.size(-1)
    expected = {"q_pe": (q_pe, (bsz, seqlen, heads, rope)), "k_nope": (k_nope, (bsz, seqlen, heads, dn)),
                "k_pe": (k_pe, (bsz, seqlen, rope)), "v": (v, (bsz, seqlen, heads, v.size(-1)))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match q_nope {tuple(q_nope.shape)}, got {tuple(t.shape)}")
        if t.dtype != q_nope.dtype or t.device != q_nope.device:
            raise TypeError(f"{name} must be {q_nope.dtype} on {q_nope.device}, got {t.dtype} on {t.device}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of query rows, got {chunk}")
    dtype = q_nope.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if save_probs is None:
        save_probs = _probs_bytes(bsz, heads, seqlen, chunk, work.itemsize) <= SAVED_PROBS_BUDGET
    # a unit last-dim stride is what the strided GEMMs need; views from split/view have it
    args = [t.to(work) if t.stride(-1) == 1 else t.to(work).contiguous() for t in (q_nope, q_pe, k_nope, k_pe, v)]
    out = _ChunkedCausalAttention.apply(*args, scale, chunk, save_probs)
    return out.to(dtype)
