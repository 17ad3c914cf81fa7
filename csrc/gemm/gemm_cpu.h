// CPU implementations of the FP8 GEMM ops whose schemas are in gemm_ops.cpp (see there for the
// shapes and semantics of every argument).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dsv3 {

void fp8_gemm_nt_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                         const std::optional<at::Tensor>& c, const at::Tensor& d);
// B [N, K] e4m3 decoded once into the packed path's fp32 panels: [ceil(N/16), K, 16] float32;
// a grouped B [G, N, K] gives [G, ceil(N/16), K, 16] (each group packed as its own [N, K]).
at::Tensor fp8_prepack_b_cpu(const at::Tensor& b);
// fp8_gemm_nt_out with b_panels = fp8_prepack_b_cpu(b) (used when M > 16; GEMV reads b itself).
void fp8_gemm_nt_prepacked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                   const at::Tensor& sb, const at::Tensor& b_panels, const std::optional<at::Tensor>& c,
                                   const at::Tensor& d);
void m_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, const at::Tensor& m_indices, const at::Tensor& d);
// The grouped GEMMs with b_panels = fp8_prepack_b_cpu(b) for a grouped b [G, N, K] (used by the
// groups with more than 16 rows; GEMV groups read b itself).
void m_grouped_fp8_gemm_nt_contiguous_prepacked_out_cpu(const at::Tensor& a, const at::Tensor& sa,
                                                        const at::Tensor& b, const at::Tensor& sb,
                                                        const at::Tensor& b_panels, const at::Tensor& m_indices,
                                                        const at::Tensor& d);
void m_grouped_fp8_gemm_nt_masked_prepacked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                                    const at::Tensor& sb, const at::Tensor& b_panels,
                                                    const at::Tensor& masked_m, int64_t expected_m,
                                                    const at::Tensor& d);
void m_grouped_fp8_gemm_nt_masked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                          const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                          const at::Tensor& d);
void k_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, at::IntArrayRef ks,
                                              const std::optional<at::Tensor>& c, const at::Tensor& d);

}  // namespace dsv3
