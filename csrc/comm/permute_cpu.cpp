// Expert-major permutation of received tokens (the input layout of the grouped GEMMs) and its
// inverse with the top-k weighted reduction, on the CPU.
//
// Row n of the received tokens is copied once for every j with 0 <= topk_idx[n, j] < L (a local
// expert). Rows of expert e form one contiguous segment, ordered by n; each segment is padded
// with zero rows up to a multiple of `alignment`, and m_indices [M] int32 names the expert of
// each row, -1 for padding: the layout m_grouped_fp8_gemm_nt_contiguous consumes.
// row_pos [N, k] int64 says where each (token, slot) copy went (-1: no local expert there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "comm_checks.h"

namespace dsv3 {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> moe_permute_cpu(at::TensorList payloads,
                                                                            const at::Tensor& topk_idx,
                                                                            int64_t num_local_experts,
                                                                            int64_t alignment) {
  comm_checks::permute_args(payloads, topk_idx, num_local_experts, alignment);
  const int64_t n = topk_idx.size(0), k = topk_idx.size(1), num_e = num_local_experts;
  const int64_t* idx = topk_idx.data_ptr<int64_t>();

  // Segment starts: counts per expert, each rounded up to the alignment.
  std::vector<int64_t> count(num_e, 0);
  for (int64_t i = 0; i < n * k; ++i) {
    TORCH_CHECK(idx[i] >= -1, "moe_permute: topk_idx entry ", idx[i], " below -1");
    if (idx[i] >= 0 && idx[i] < num_e) ++count[idx[i]];
  }
  std::vector<int64_t> start(num_e + 1, 0);
  for (int64_t e = 0; e < num_e; ++e) start[e + 1] = start[e] + (count[e] + alignment - 1) / alignment * alignment;
  const int64_t m = start[num_e];

  auto row_pos = at::empty({n, k}, topk_idx.options());
  int64_t* rp = row_pos.data_ptr<int64_t>();
  auto m_indices = at::empty({m}, topk_idx.options().dtype(at::kInt));
  int32_t* mi = m_indices.data_ptr<int32_t>();
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n * k; ++i) rp[i] = (idx[i] >= 0 && idx[i] < num_e) ? next[idx[i]]++ : -1;
  for (int64_t e = 0; e < num_e; ++e) {
    for (int64_t r = start[e]; r < start[e] + count[e]; ++r) mi[r] = static_cast<int32_t>(e);
    for (int64_t r = start[e] + count[e]; r < start[e + 1]; ++r) mi[r] = -1;
  }

  std::vector<at::Tensor> outs;
  for (const auto& p : payloads) {
    const int64_t w = p.size(1);
    auto out = at::empty({m, w}, p.options());
    const uint8_t* src = p.data_ptr<uint8_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    for (int64_t e = 0; e < num_e; ++e)  // padding rows are zero
      std::memset(dst + (start[e] + count[e]) * w, 0, (start[e + 1] - start[e] - count[e]) * w);
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, w * k));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < k; ++j)
          if (rp[t * k + j] >= 0) std::memcpy(dst + rp[t * k + j] * w, src + t * w, w);
    });
    outs.push_back(out);
  }
  return {outs, m_indices, row_pos};
}

// out[n] = sum_j weights[n, j] * y[row_pos[n, j]] over slots with row_pos >= 0, in j order, in
// FP32 (FP64 for float64 y); zero for a token with no local expert.
at::Tensor moe_unpermute_cpu(const at::Tensor& y, const at::Tensor& row_pos, const at::Tensor& weights) {
  comm_checks::unpermute_args(y, row_pos, weights);
  const int64_t m = y.size(0), h = y.size(1), n = row_pos.size(0), k = row_pos.size(1);
  const int64_t* rp = row_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < n * k; ++i)
    TORCH_CHECK(rp[i] < m, "moe_unpermute: row_pos entry ", rp[i], " past the ", m, " rows of y");
  const float* w = weights.data_ptr<float>();
  auto out = at::empty({n, h}, y.options());
  if (out.numel() == 0) return out;
  DSV3_DISPATCH_COMM_FLOATS(y.scalar_type(), "moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = y.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * k));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(h);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = rp[t * k + j];
          if (p < 0) continue;
          const acc_t wj = static_cast<acc_t>(w[t * k + j]);
          const scalar_t* row = in + p * h;
          for (int64_t c = 0; c < h; ++c) acc[c] += wj * static_cast<acc_t>(row[c]);
        }
        for (int64_t c = 0; c < h; ++c) o[t * h + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
}

}  // namespace dsv3
