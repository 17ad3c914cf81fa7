// Schemas of the FP8 GEMM ops (namespace dsv3) and their CPU registrations.
//
// Every op is an out-variant: ops/gemm.py validates the arguments, allocates or checks the
// output, makes scale tensors contiguous, and then calls the op. Kernels still TORCH_CHECK
// every shape they use. The same schemas are implemented for CUDA in csrc/gemm/*.cu.
//
// Common conventions
//   * FP8 payloads are float8_e4m3fn, row-major and contiguous; scales are float32, contiguous.
//   * kb(K) = ceil(K / 128): the number of 128-wide K blocks (the last one may be shorter: any K).
//   * A (LHS) scales are 1x128 tiles: sa[m, kb] scales A[m, kb*128 : kb*128+128].
//   * B (RHS, stored [N, K], i.e. "NT") scales come in two layouts, told apart by sb.size(-2):
//       - 128x128 blocks:  sb [ceil(N/128), kb(K)], sb[n / 128, kb] scales B[n, kb block]
//       - 1x128 per row:   sb [N, kb(K)],           sb[n, kb]       scales B[n, kb block]
//     (when N == 1 both layouts are the same tensor). The per-row layout is what the
//     weight-gradient GEMM needs (both operands quantized along the token dimension).
//   * Accumulation (DeepSeek-V3 "FP32 promotion"): for every output element and every K block,
//     the block's partial dot product sum_{k in block} A[m,k] * B[n,k] is computed in FP32 and
//     then added to an FP32 accumulator multiplied by sa[m,kb] * sb[.,kb]. The final FP32 value
//     (plus C when given) is rounded once to d's dtype (bf16: round-to-nearest-even).
//   * NaN payload bytes (0x7F/0xFF) and NaN/Inf scales propagate as NaN.
#include <torch/library.h>

#include "gemm_cpu.h"

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  // D = C + A @ B^T.
  //   a [M, K] e4m3; sa [M, kb(K)] f32; b [N, K] e4m3; sb [ceil(N/128), kb(K)] or [N, kb(K)] f32;
  //   c None or [M, N] f32 contiguous (may be the same tensor as d);
  //   d [M, N] bf16 or f32 contiguous (f32 when c is given). M, N, K >= 0, any values.
  m.def("fp8_gemm_nt_out(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor? c, Tensor(a!) d) -> ()");

  // Pre-packed weights (CPU only; ops.prepack_fp8_weight): B decoded once, instead of on every
  // call, into the fp32 panels the packed (M > 16) CPU path multiplies:
  //   fp8_prepack_b(b [N, K] e4m3) -> [ceil(N/16), K, 16] f32, element (p, k, r) = B[16p + r, k] / 256
  //   (exact; zeros past N). Scales are not folded in: sb is applied at promotion as always.
  //   fp8_gemm_nt_prepacked_out: fp8_gemm_nt_out plus b_panels = fp8_prepack_b(b) (b is still
  //   passed: the GEMV path, M <= 16, streams the FP8 bytes, half the bytes of BF16).
  //   A grouped b [G, N, K] (MoE experts) packs to [G, ceil(N/16), K, 16], each group on its own;
  //   m_grouped_fp8_gemm_nt_{contiguous,masked}_prepacked_out are the grouped ops plus those
  //   b_panels (used by every group GEMM with more than 16 rows).
  m.def("fp8_prepack_b(Tensor b) -> Tensor");
  m.def("fp8_gemm_nt_prepacked_out(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor b_panels, Tensor? c, "
        "Tensor(a!) d) -> ()");

  // Grouped GEMM, groups contiguous along M (MoE experts after dispatch):
  //   a [M, K] e4m3; sa [M, kb(K)] f32; b [G, N, K] e4m3;
  //   sb [G, ceil(N/128), kb(K)] (or per-row [G, N, kb(K)]) f32;
  //   m_indices [M] int32: row m uses expert m_indices[m] in [0, G), or -1 = padding row;
  //   d [M, N] bf16 or f32. d[m] = A[m] @ B[m_indices[m]]^T; rows with -1 are written as zeros.
  //   Rows need not be sorted or aligned (alignment 1 on the CPU); runs of equal indices are
  //   processed as one GEMM.
  m.def("m_grouped_fp8_gemm_nt_contiguous_out(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor m_indices, "
        "Tensor(a!) d) -> ()");

  // The same with a weight packed by fp8_prepack_b(b [G, N, K]) (CPU only; see above).
  m.def("m_grouped_fp8_gemm_nt_contiguous_prepacked_out(Tensor a, Tensor sa, Tensor b, Tensor sb, "
        "Tensor b_panels, Tensor m_indices, Tensor(a!) d) -> ()");

  // Grouped GEMM with a per-group valid row count (low-latency dispatch layout):
  //   a [G, Mmax, K] e4m3; sa [G, Mmax, kb(K)] f32; b [G, N, K] e4m3;
  //   sb [G, ceil(N/128), kb(K)] (or per-row [G, N, kb(K)]) f32;
  //   masked_m [G] int32 with 0 <= masked_m[g] <= Mmax (checked in Python);
  //   expected_m: a hint of the typical masked_m (tile choice on CUDA; ignored on the CPU);
  //   d [G, Mmax, N] bf16 or f32. d[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T; the rows
  //   past masked_m[g] are not touched.
  m.def("m_grouped_fp8_gemm_nt_masked_out(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor masked_m, "
        "int expected_m, Tensor(a!) d) -> ()");

  // The same with a weight packed by fp8_prepack_b(b [G, N, K]) (CPU only; see above).
  m.def("m_grouped_fp8_gemm_nt_masked_prepacked_out(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor b_panels, "
        "Tensor masked_m, int expected_m, Tensor(a!) d) -> ()");

  // Grouped GEMM with groups concatenated along the reduction (token) dimension: the weight
  // gradient of MoE experts, dW_g = dY_g^T @ X_g.
  //   ks: G group sizes (>= 0) along K, sumK = sum(ks); group g covers columns
  //       [k0_g, k0_g + ks[g]) with k0_g = ks[0] + ... + ks[g-1].
  //   a [M, sumK] e4m3 (e.g. dY^T); b [N, sumK] e4m3 (e.g. X^T);
  //   sa [M, S] and sb [N, S] f32 with S = sum_g ceil(ks[g] / 128): 1x128 tiles along K that
  //       restart at each group's first column (a tile never straddles two groups). Column
  //       s0_g + j (s0_g = sum_{g'<g} ceil(ks[g'] / 128)) scales columns k0_g + 128j .. +128.
  //       ops.grouped_transposed_per_token_cast_to_fp8 produces exactly these operands.
  //   c None or [G, M, N] f32 (may be the same tensor as d); d [G, M, N] f32 or bf16.
  //   d[g] = c[g] + A[:, group g] @ B[:, group g]^T; an empty group gives c[g] (or zeros).
  m.def("k_grouped_fp8_gemm_nt_contiguous_out(Tensor a, Tensor sa, Tensor b, Tensor sb, int[] ks, Tensor? c, "
        "Tensor(a!) d) -> ()");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("fp8_gemm_nt_out", &dsv3::fp8_gemm_nt_out_cpu);
  m.impl("fp8_prepack_b", &dsv3::fp8_prepack_b_cpu);
  m.impl("fp8_gemm_nt_prepacked_out", &dsv3::fp8_gemm_nt_prepacked_out_cpu);
  m.impl("m_grouped_fp8_gemm_nt_contiguous_out", &dsv3::m_grouped_fp8_gemm_nt_contiguous_out_cpu);
  m.impl("m_grouped_fp8_gemm_nt_masked_out", &dsv3::m_grouped_fp8_gemm_nt_masked_out_cpu);
  m.impl("m_grouped_fp8_gemm_nt_contiguous_prepacked_out", &dsv3::m_grouped_fp8_gemm_nt_contiguous_prepacked_out_cpu);
  m.impl("m_grouped_fp8_gemm_nt_masked_prepacked_out", &dsv3::m_grouped_fp8_gemm_nt_masked_prepacked_out_cpu);
  m.impl("k_grouped_fp8_gemm_nt_contiguous_out", &dsv3::k_grouped_fp8_gemm_nt_contiguous_out_cpu);
}
