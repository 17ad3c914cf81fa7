// CUDA versions of the comm kernels (same op names and results as the CPU files; argument checks
// shared through comm_checks.h): layout counts, send positions, send-buffer packing with top-k
// metadata, unpacking, the combine's FP32 (FP64 for double) reduction, and the
// expert-major permutation and its weighted inverse. Index bookkeeping (prefix sums, sorts) uses
// ATen ops on the device; the kernels move rows. Simple, certainly-correct kernels first: one
// thread block per row, threads over bytes or channels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "comm_checks.h"

namespace dsv3 {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSegments = 8;

struct Segments {
  uint8_t* ptr[kMaxSegments];
  int64_t width[kMaxSegments];
  int count;
};

void check_launch() {
  cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

__global__ void layout_kernel(const int64_t* __restrict__ idx, int64_t t_count, int64_t k, int64_t epr,
                              int64_t num_ranks, int64_t ranks_per_node, bool* __restrict__ in_rank,
                              int* __restrict__ per_rank, int* __restrict__ per_node, int* __restrict__ per_expert) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= t_count) return;
  bool* row = in_rank + t * num_ranks;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx[t * k + j];
    if (e < 0 || e >= epr * num_ranks) continue;
    atomicAdd(per_expert + e, 1);
    const int64_t r = e / epr;
    if (row[r]) continue;
    const int64_t node = r / ranks_per_node;
    bool node_seen = false;
    for (int64_t q = node * ranks_per_node; q < (node + 1) * ranks_per_node; ++q) node_seen |= row[q];
    row[r] = true;
    atomicAdd(per_rank + r, 1);
    if (!node_seen) atomicAdd(per_node + node, 1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_layout_cuda(
    const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t ranks_per_node) {
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.is_contiguous() && topk_idx.scalar_type() == at::kLong,
              "moe_dispatch_layout: topk_idx must be a contiguous int64 [T, k] tensor");
  TORCH_CHECK(num_ranks > 0 && num_experts % num_ranks == 0 && ranks_per_node > 0 && num_ranks % ranks_per_node == 0,
              "moe_dispatch_layout: bad num_experts / num_ranks / ranks_per_node");
  c10::cuda::CUDAGuard guard(topk_idx.device());
  const int64_t t_count = topk_idx.size(0), k = topk_idx.size(1);
  auto opts = topk_idx.options();
  auto in_rank = at::zeros({t_count, num_ranks}, opts.dtype(at::kBool));
  auto per_rank = at::zeros({num_ranks}, opts.dtype(at::kInt));
  auto per_node = at::zeros({num_ranks / ranks_per_node}, opts.dtype(at::kInt));
  auto per_expert = at::zeros({num_experts}, opts.dtype(at::kInt));
  if (t_count > 0) {
    layout_kernel<<<(t_count + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        topk_idx.data_ptr<int64_t>(), t_count, k, num_experts / num_ranks, num_ranks, ranks_per_node,
        in_rank.data_ptr<bool>(), per_rank.data_ptr<int>(), per_node.data_ptr<int>(), per_expert.data_ptr<int>());
    check_launch();
  }
  return {per_rank, per_node, per_expert, in_rank};
}

// Row of each (token, rank): destination-major, token-minor; -1 where not sent.
at::Tensor moe_send_positions_cuda(const at::Tensor& in_rank) {
  TORCH_CHECK(in_rank.dim() == 2 && in_rank.is_contiguous() && in_rank.scalar_type() == at::kBool,
              "moe_send_positions: is_token_in_rank must be a contiguous bool [T, R] tensor");
  c10::cuda::CUDAGuard guard(in_rank.device());
  auto sent = in_rank.to(at::kLong);                           // [T, R]
  auto before = sent.cumsum(0) - sent;                         // earlier tokens to the same rank
  auto per_rank = sent.sum(0);                                 // [R]
  auto offset = per_rank.cumsum(0) - per_rank;                 // first row of each rank
  return at::where(in_rank, before + offset.unsqueeze(0), at::full({}, -1, sent.options()));
}

__global__ void pack_kernel(Segments src, const int64_t* __restrict__ pos, int64_t num_ranks,
                            const int64_t* __restrict__ idx, const float* __restrict__ wts, int64_t k,
                            int64_t epr, int64_t expert_base, uint8_t* __restrict__ out, int64_t row_bytes) {
  const int64_t t = blockIdx.x;
  for (int64_t r = 0; r < num_ranks; ++r) {
    const int64_t p = pos[t * num_ranks + r];
    if (p < 0) continue;
    uint8_t* row = out + p * row_bytes;
    for (int s = 0; s < src.count; ++s) {
      const uint8_t* in = src.ptr[s] + t * src.width[s];
      for (int64_t b = threadIdx.x; b < src.width[s]; b += blockDim.x) row[b] = in[b];
      row += src.width[s];
    }
    if (k == 0) continue;
    const int64_t first = expert_base + r * epr;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t e = idx[t * k + j];
      const bool here = e >= first && e < first + epr;
      const int64_t local = here ? e - first : -1;
      const float w = here ? wts[t * k + j] : 0.0f;
      memcpy(row + j * sizeof(int64_t), &local, sizeof(int64_t));
      memcpy(row + k * sizeof(int64_t) + j * sizeof(float), &w, sizeof(float));
    }
  }
}

Segments make_segments(at::TensorList ts, int64_t rows, const char* what) {
  TORCH_CHECK(static_cast<int>(ts.size()) <= kMaxSegments, what, ": at most ", kMaxSegments, " segments");
  Segments seg{};
  seg.count = static_cast<int>(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].dim() == 2 && ts[i].is_contiguous() && ts[i].scalar_type() == at::kByte && ts[i].size(0) == rows,
                what, ": segments must be contiguous uint8 [", rows, ", w] matrices");
    seg.ptr[i] = ts[i].data_ptr<uint8_t>();
    seg.width[i] = ts[i].size(1);
  }
  return seg;
}

void moe_dispatch_pack_cuda(at::TensorList payloads, const at::Tensor& send_pos,
                            const c10::optional<at::Tensor>& topk_idx, const c10::optional<at::Tensor>& topk_weights,
                            int64_t experts_per_rank, int64_t expert_base, const at::Tensor& out) {
  const int64_t k = comm_checks::pack_args(payloads, send_pos, topk_idx, topk_weights, experts_per_rank, out);
  c10::cuda::CUDAGuard guard(send_pos.device());
  const int64_t t_count = send_pos.size(0), num_ranks = send_pos.size(1);
  Segments seg = make_segments(payloads, t_count, "moe_dispatch_pack");
  if (t_count == 0 || num_ranks == 0) return;
  const int64_t top = send_pos.max().item<int64_t>();
  TORCH_CHECK(top < out.size(0) && send_pos.min().item<int64_t>() >= -1, "moe_dispatch_pack: send_pos entries ",
              "must lie in [-1, ", out.size(0), ")");
  if (top < 0) return;
  pack_kernel<<<t_count, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      seg, send_pos.data_ptr<int64_t>(), num_ranks, k ? topk_idx->data_ptr<int64_t>() : nullptr,
      k ? topk_weights->data_ptr<float>() : nullptr, k, experts_per_rank, expert_base, out.data_ptr<uint8_t>(),
      out.size(1));
  check_launch();
}

__global__ void unpack_kernel(const uint8_t* __restrict__ in, int64_t row_bytes, Segments dst) {
  const int64_t i = blockIdx.x;
  const uint8_t* row = in + i * row_bytes;
  for (int s = 0; s < dst.count; ++s) {
    uint8_t* out = dst.ptr[s] + i * dst.width[s];
    for (int64_t b = threadIdx.x; b < dst.width[s]; b += blockDim.x) out[b] = row[b];
    row += dst.width[s];
  }
}

void moe_unpack_rows_cuda(const at::Tensor& buf, at::TensorList outs) {
  TORCH_CHECK(buf.dim() == 2 && buf.is_contiguous() && buf.scalar_type() == at::kByte,
              "moe_unpack_rows: buf must be a contiguous uint8 matrix");
  c10::cuda::CUDAGuard guard(buf.device());
  Segments seg = make_segments(outs, buf.size(0), "moe_unpack_rows");
  int64_t total = 0;
  for (int i = 0; i < seg.count; ++i) total += seg.width[i];
  TORCH_CHECK(total == buf.size(1), "moe_unpack_rows: segment widths do not sum to the row size");
  if (buf.size(0) == 0) return;
  unpack_kernel<<<buf.size(0), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(buf.data_ptr<uint8_t>(), buf.size(1), seg);
  check_launch();
}

// out[t] = sum_j w(t, j) * in[pos[t, j]] over j with pos >= 0, accumulated in opmath (FP32, FP64
// for double); w = 1 when null.
template <typename T>
__global__ void gather_sum_kernel(const T* __restrict__ in, const int64_t* __restrict__ pos, const float* __restrict__ w,
                                  int64_t slots, int64_t h, T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    acc_t acc = acc_t(0);
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t p = pos[t * slots + j];
      if (p >= 0) acc += (w ? static_cast<acc_t>(w[t * slots + j]) : acc_t(1)) * static_cast<acc_t>(in[p * h + c]);
    }
    out[t * h + c] = static_cast<T>(acc);
  }
}

void launch_gather_sum(const at::Tensor& in, const at::Tensor& pos, const float* w, const at::Tensor& out) {
  if (out.numel() == 0) return;
  DSV3_DISPATCH_COMM_FLOATS(in.scalar_type(), "moe_gather_sum", [&] {
    gather_sum_kernel<scalar_t><<<pos.size(0), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        in.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), w, pos.size(1), in.size(1), out.data_ptr<scalar_t>());
  });
  check_launch();
}

void moe_combine_reduce_cuda(const at::Tensor& recv, const at::Tensor& send_pos, const at::Tensor& out) {
  comm_checks::combine_reduce_args(recv, send_pos, out);
  c10::cuda::CUDAGuard guard(recv.device());
  launch_gather_sum(recv, send_pos, nullptr, out);
}

__global__ void permute_copy_kernel(const uint8_t* __restrict__ in, const int64_t* __restrict__ row_pos, int64_t k,
                                    int64_t w, uint8_t* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t p = row_pos[t * k + j];
    if (p < 0) continue;
    for (int64_t b = threadIdx.x; b < w; b += blockDim.x) out[p * w + b] = in[t * w + b];
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> moe_permute_cuda(at::TensorList payloads,
                                                                             const at::Tensor& topk_idx,
                                                                             int64_t num_local_experts,
                                                                             int64_t alignment) {
  comm_checks::permute_args(payloads, topk_idx, num_local_experts, alignment);
  c10::cuda::CUDAGuard guard(topk_idx.device());
  const int64_t n = topk_idx.size(0), k = topk_idx.size(1);
  auto flat = topk_idx.reshape({-1});
  auto valid = (flat >= 0).logical_and(flat < num_local_experts);
  auto key = at::where(valid, flat, at::full({}, num_local_experts, flat.options()));
  auto counts = at::bincount(key, {}, num_local_experts + 1).slice(0, 0, num_local_experts);  // [L]
  auto padded = (counts + alignment - 1).div(alignment, "floor") * alignment;
  auto start = padded.cumsum(0) - padded;
  const int64_t m = padded.sum().item<int64_t>();
  // Stable sort by expert keeps token order inside each segment.
  auto order = std::get<1>(key.sort(/*stable=*/true, 0, false));
  auto sorted_key = key.index_select(0, order);
  auto rank_in_sorted = at::arange(flat.numel(), flat.options());
  auto seg_first = (counts.cumsum(0) - counts);  // first sorted index of each expert
  auto clamped = sorted_key.clamp_max(num_local_experts - 1);
  auto dest_sorted = start.index_select(0, clamped) + rank_in_sorted - seg_first.index_select(0, clamped);
  dest_sorted = at::where(sorted_key < num_local_experts, dest_sorted, at::full({}, -1, flat.options()));
  auto row_pos = at::empty_like(flat).index_put_({order}, dest_sorted).view({n, k});
  auto rows = at::arange(m, flat.options());
  auto seg = at::searchsorted(start + padded, rows, false, /*right=*/true).clamp_max(num_local_experts - 1);
  auto within = rows - start.index_select(0, seg);
  auto m_indices = at::where(within < counts.index_select(0, seg), seg, at::full({}, -1, seg.options())).to(at::kInt);
  std::vector<at::Tensor> outs;
  for (const auto& p : payloads) {
    auto out = at::zeros({m, p.size(1)}, p.options());
    if (n > 0 && m > 0) {
      permute_copy_kernel<<<n, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.data_ptr<uint8_t>(), row_pos.data_ptr<int64_t>(), k, p.size(1), out.data_ptr<uint8_t>());
      check_launch();
    }
    outs.push_back(out);
  }
  return {outs, m_indices, row_pos};
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y, const at::Tensor& row_pos, const at::Tensor& weights) {
  comm_checks::unpermute_args(y, row_pos, weights);
  c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({row_pos.size(0), y.size(1)}, y.options());
  launch_gather_sum(y, row_pos, weights.data_ptr<float>(), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) {
  m.impl("moe_dispatch_layout", &moe_dispatch_layout_cuda);
  m.impl("moe_send_positions", &moe_send_positions_cuda);
  m.impl("moe_dispatch_pack", &moe_dispatch_pack_cuda);
  m.impl("moe_unpack_rows", &moe_unpack_rows_cuda);
  m.impl("moe_combine_reduce", &moe_combine_reduce_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
}

}  // namespace dsv3
