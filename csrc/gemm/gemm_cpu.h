// CPU implementations of the FP8 GEMM ops whose schemas are in gemm_ops.cpp (see there for the
// shapes and semantics of every argument).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dsv3 {

void fp8_gemm_nt_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                         const std::optional<at::Tensor>& c, const at::Tensor& d);
void m_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, const at::Tensor& m_indices, const at::Tensor& d);
void m_grouped_fp8_gemm_nt_masked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                          const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                          const at::Tensor& d);
void k_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, at::IntArrayRef ks,
                                              const std::optional<at::Tensor>& c, const at::Tensor& d);

}  // namespace dsv3
