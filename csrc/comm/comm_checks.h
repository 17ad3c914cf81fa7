// What the comm kernels accept, shared by the CPU (.cpp) and CUDA (.cu) versions so that both
// reject the same inputs with the same messages: argument checks of the permutation, pack and
// reduction ops, and the dtype dispatch of the kernels that do arithmetic on rows.
//
// Rows that are only moved (dispatch, pack, unpack, permute) travel as bytes and carry any dtype.
// Rows that are summed (combine, unpermute) are float32, bfloat16, float16 or float64, summed in
// at::opmath_type<scalar_t>: float32 for the first three, float64 for float64 (a float64 model
// keeps float64 sums end to end).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define DSV3_DISPATCH_COMM_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

namespace dsv3 {
namespace comm_checks {

// moe_permute(payloads, topk_idx, num_local_experts, alignment): topk_idx int64 [N, k], positive
// counts, payloads contiguous uint8 [N, w].
inline void permute_args(at::TensorList payloads, const at::Tensor& topk_idx, int64_t num_local_experts,
                         int64_t alignment) {
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.is_contiguous() && topk_idx.scalar_type() == at::kLong,
              "moe_permute: topk_idx must be a contiguous int64 [N, k] tensor");
  TORCH_CHECK(num_local_experts > 0 && alignment > 0, "moe_permute: num_local_experts and alignment must be positive");
  for (const auto& p : payloads)
    TORCH_CHECK(p.dim() == 2 && p.is_contiguous() && p.scalar_type() == at::kByte && p.size(0) == topk_idx.size(0),
                "moe_permute: payloads must be contiguous uint8 [N, w] matrices");
}

// moe_unpermute(y, row_pos, weights): y [M, H], row_pos int64 [N, k], weights float32 [N, k].
inline void unpermute_args(const at::Tensor& y, const at::Tensor& row_pos, const at::Tensor& weights) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous(), "moe_unpermute: y must be a contiguous [M, H] tensor");
  TORCH_CHECK(row_pos.dim() == 2 && row_pos.is_contiguous() && row_pos.scalar_type() == at::kLong,
              "moe_unpermute: row_pos must be a contiguous int64 [N, k] tensor");
  TORCH_CHECK(weights.is_contiguous() && weights.scalar_type() == at::kFloat && weights.sizes() == row_pos.sizes(),
              "moe_unpermute: weights must be a contiguous float32 tensor shaped like row_pos");
  TORCH_CHECK(y.device() == row_pos.device() && y.device() == weights.device(),
              "moe_unpermute: y, row_pos and weights must be on one device");
}

// moe_combine_reduce(recv, send_pos, out): recv [S, H], send_pos int64 [T, R], out [T, H] of recv's dtype.
inline void combine_reduce_args(const at::Tensor& recv, const at::Tensor& send_pos, const at::Tensor& out) {
  TORCH_CHECK(recv.dim() == 2 && recv.is_contiguous(), "moe_combine_reduce: recv must be a contiguous [S, H] tensor");
  TORCH_CHECK(send_pos.dim() == 2 && send_pos.is_contiguous() && send_pos.scalar_type() == at::kLong,
              "moe_combine_reduce: send_pos must be a contiguous int64 [T, R] tensor");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == send_pos.size(0) && out.size(1) == recv.size(1) &&
                  out.scalar_type() == recv.scalar_type(),
              "moe_combine_reduce: out must be a contiguous [T, H] tensor of recv's dtype");
}

// moe_dispatch_pack(payloads, send_pos, topk_idx, topk_weights, experts_per_rank, expert_base, out):
// payloads contiguous uint8 [T, w_i]; send_pos int64 [T, R]; top-k int64 / float32 [T, k] or both
// absent; out contiguous uint8 [S, sum(w_i) + 12k]. Returns k (0 without top-k).
inline int64_t pack_args(at::TensorList payloads, const at::Tensor& send_pos, const c10::optional<at::Tensor>& topk_idx,
                         const c10::optional<at::Tensor>& topk_weights, int64_t experts_per_rank,
                         const at::Tensor& out) {
  TORCH_CHECK(send_pos.dim() == 2 && send_pos.is_contiguous() && send_pos.scalar_type() == at::kLong,
              "moe_dispatch_pack: send_pos must be a contiguous int64 [T, R] tensor");
  const int64_t t_count = send_pos.size(0);
  int64_t row_bytes = 0;
  for (const auto& p : payloads) {
    TORCH_CHECK(p.dim() == 2 && p.is_contiguous() && p.scalar_type() == at::kByte && p.size(0) == t_count,
                "moe_dispatch_pack: payloads must be contiguous uint8 [T, w] matrices with send_pos's T rows");
    row_bytes += p.size(1);
  }
  TORCH_CHECK(topk_idx.has_value() == topk_weights.has_value(),
              "moe_dispatch_pack: topk_idx and topk_weights go together");
  int64_t k = 0;
  if (topk_idx.has_value()) {
    TORCH_CHECK(topk_idx->dim() == 2 && topk_idx->is_contiguous() && topk_idx->scalar_type() == at::kLong &&
                    topk_idx->size(0) == t_count,
                "moe_dispatch_pack: topk_idx must be a contiguous int64 [T, k] tensor");
    TORCH_CHECK(topk_weights->is_contiguous() && topk_weights->scalar_type() == at::kFloat &&
                    topk_weights->sizes() == topk_idx->sizes(),
                "moe_dispatch_pack: topk_weights must be a contiguous float32 tensor shaped like topk_idx");
    TORCH_CHECK(experts_per_rank > 0, "moe_dispatch_pack: experts_per_rank must be positive");
    k = topk_idx->size(1);
    row_bytes += k * static_cast<int64_t>(sizeof(int64_t) + sizeof(float));
  }
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kByte && out.size(1) == row_bytes,
              "moe_dispatch_pack: out must be a contiguous uint8 [S, ", row_bytes, "] matrix");
  return k;
}

}  // namespace comm_checks
}  // namespace dsv3
