"""One small call of every CUDA FP8 GEMM op, for compute-sanitizer to watch (bench/gpu_check.sh).

The CUDA GEMM kernels were written without a GPU; the first GPU run checks their results
(tests/ops/test_gemm_cuda.py) and, through this script under compute-sanitizer, their memory
accesses (memcheck: out-of-bounds or misaligned global and shared accesses) and shared-memory
ordering (racecheck). The kernel is the one DSV3_FP8_GEMM_KERNEL selects. Shapes are small and
ragged (every edge of a tile is exercised) because the sanitizer slows kernels down a hundredfold.

    DSV3_FP8_GEMM_KERNEL=tma compute-sanitizer --tool memcheck python3 -m bench.gpu_sanitize
"""

from __future__ import annotations

import os

import torch

import ops
from ops._native import _C, native


def main() -> None:
    m, n, k, groups = 200, 300, 272, 3  # K: two full 128-blocks and a ragged one, rows 16-byte aligned
    x = torch.randn(m, k, device="cuda")
    a, sa = ops.per_token_cast_to_fp8(x)
    b, sb = ops.per_block_cast_to_fp8(torch.randn(n, k, device="cuda"))
    native.fp8_gemm_nt_out(a, sa, b, sb, None, torch.empty(m, n, device="cuda", dtype=torch.bfloat16))

    bq = [ops.per_block_cast_to_fp8(torch.randn(n, k, device="cuda")) for _ in range(groups)]
    bg, sbg = torch.stack([q for q, _ in bq]), torch.stack([s for _, s in bq])
    m_indices = torch.randint(-1, groups, (m,), device="cuda", dtype=torch.int32)
    native.m_grouped_fp8_gemm_nt_contiguous_out(a, sa, bg, sbg, m_indices, torch.empty(m, n, device="cuda"))

    am, sam = ops.per_token_cast_to_fp8(torch.randn(groups, 150, k, device="cuda"))
    masked = torch.tensor([0, 70, 150], device="cuda", dtype=torch.int32)
    native.m_grouped_fp8_gemm_nt_masked_out(am, sam, bg, sbg, masked, 150, torch.empty(groups, 150, n, device="cuda"))

    ks = [0, 128, 144]  # Wgrad: each group quantized along its own tokens
    parts = [(ops.transposed_per_token_cast_to_fp8(torch.randn(kg, m, device="cuda")),
              ops.transposed_per_token_cast_to_fp8(torch.randn(kg, n, device="cuda"))) for kg in ks]
    a_k, sa_k = (torch.cat([pa[i] for pa, _ in parts], 1) for i in (0, 1))
    b_k, sb_k = (torch.cat([pb[i] for _, pb in parts], 1) for i in (0, 1))
    native.k_grouped_fp8_gemm_nt_contiguous_out(a_k, sa_k, b_k, sb_k, ks, None,
                                                torch.empty(len(ks), m, n, device="cuda"))
    torch.cuda.synchronize()
    launches = _C.fp8_gemm_cuda_launches()
    print("launches:", launches)
    # tma takes all but the empty k-group (which falls back to wgmma): else this checked wgmma twice
    if os.environ.get("DSV3_FP8_GEMM_KERNEL") == "tma" and torch.cuda.get_device_capability()[0] == 9:
        assert launches["tma"] == 5 and launches["wgmma"] == 1, f"the TMA kernel did not take these calls: {launches}"


if __name__ == "__main__":
    main()
