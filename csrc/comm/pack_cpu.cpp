// Packing and unpacking of the dispatch send buffer, and the combine's FP32 reduction, on the CPU.
//
// The send buffer is a uint8 matrix [S, row_bytes]: one row per (token, destination rank) pair
// with is_token_in_rank set, ordered by destination rank and then by token index, so that each
// destination's rows are one contiguous split of a variable-size all-to-all. A row holds the
// token's payload bytes (any dtype, viewed as uint8: bf16 rows, FP8 rows and their scales) and,
// when top-k metadata travels, k int64 expert indices made local to the destination (-1 where
// the expert lives elsewhere) and k float32 weights (0.0 at those positions).
//
// send_pos [T, R] int64 records where each (token, rank) row went (-1 if not sent): the combine
// reads the returning rows back through it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../common/dispatch.h"

namespace dsv3 {
namespace {

void check_byte_matrix(const at::Tensor& t, int64_t rows, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kByte, what,
              ": expected a contiguous uint8 matrix");
  TORCH_CHECK(t.size(0) == rows, what, ": expected ", rows, " rows, got ", t.size(0));
}

std::tuple<at::Tensor, at::Tensor> moe_dispatch_pack_cpu(at::TensorList payloads, const at::Tensor& is_token_in_rank,
                                                         const c10::optional<at::Tensor>& topk_idx,
                                                         const c10::optional<at::Tensor>& topk_weights,
                                                         int64_t experts_per_rank, int64_t expert_base) {
  TORCH_CHECK(is_token_in_rank.dim() == 2 && is_token_in_rank.is_contiguous() &&
                  is_token_in_rank.scalar_type() == at::kBool,
              "moe_dispatch_pack: is_token_in_rank must be a contiguous bool [T, R] tensor");
  const int64_t t_count = is_token_in_rank.size(0), num_ranks = is_token_in_rank.size(1);
  std::vector<const uint8_t*> src;
  std::vector<int64_t> widths;
  int64_t row_bytes = 0;
  for (const auto& p : payloads) {
    check_byte_matrix(p, t_count, "moe_dispatch_pack: payload");
    src.push_back(p.data_ptr<uint8_t>());
    widths.push_back(p.size(1));
    row_bytes += p.size(1);
  }
  TORCH_CHECK(topk_idx.has_value() == topk_weights.has_value(),
              "moe_dispatch_pack: topk_idx and topk_weights go together");
  const int64_t k = topk_idx.has_value() ? topk_idx->size(1) : 0;
  const int64_t* idx = nullptr;
  const float* wts = nullptr;
  if (topk_idx.has_value()) {
    TORCH_CHECK(topk_idx->dim() == 2 && topk_idx->is_contiguous() && topk_idx->scalar_type() == at::kLong &&
                    topk_idx->size(0) == t_count,
                "moe_dispatch_pack: topk_idx must be a contiguous int64 [T, k] tensor");
    TORCH_CHECK(topk_weights->dim() == 2 && topk_weights->is_contiguous() &&
                    topk_weights->scalar_type() == at::kFloat && topk_weights->sizes() == topk_idx->sizes(),
                "moe_dispatch_pack: topk_weights must be a contiguous float32 tensor shaped like topk_idx");
    TORCH_CHECK(experts_per_rank > 0, "moe_dispatch_pack: experts_per_rank must be positive");
    idx = topk_idx->data_ptr<int64_t>();
    wts = topk_weights->data_ptr<float>();
    row_bytes += k * (sizeof(int64_t) + sizeof(float));
  }

  // Row of each (token, rank): destination rank major, token index minor.
  const bool* in_rank = is_token_in_rank.data_ptr<bool>();
  auto send_pos = at::empty({t_count, num_ranks}, is_token_in_rank.options().dtype(at::kLong));
  int64_t* pos = send_pos.data_ptr<int64_t>();
  std::vector<int64_t> count(num_ranks, 0);
  at::parallel_for(0, num_ranks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t t = 0; t < t_count; ++t) count[r] += in_rank[t * num_ranks + r] ? 1 : 0;
  });
  std::vector<int64_t> offset(num_ranks + 1, 0);
  for (int64_t r = 0; r < num_ranks; ++r) offset[r + 1] = offset[r] + count[r];
  at::parallel_for(0, num_ranks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t next = offset[r];
      for (int64_t t = 0; t < t_count; ++t) pos[t * num_ranks + r] = in_rank[t * num_ranks + r] ? next++ : -1;
    }
  });

  auto send_buf = at::empty({offset[num_ranks], row_bytes}, is_token_in_rank.options().dtype(at::kByte));
  uint8_t* out = send_buf.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_bytes * num_ranks));
  at::parallel_for(0, t_count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < num_ranks; ++r) {
        const int64_t p = pos[t * num_ranks + r];
        if (p < 0) continue;
        uint8_t* row = out + p * row_bytes;
        for (size_t i = 0; i < src.size(); ++i) {
          std::memcpy(row, src[i] + t * widths[i], widths[i]);
          row += widths[i];
        }
        if (k == 0) continue;
        const int64_t first = expert_base + r * experts_per_rank;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = idx[t * k + j];
          const bool here = e >= first && e < first + experts_per_rank;
          const int64_t local = here ? e - first : -1;
          const float w = here ? wts[t * k + j] : 0.0f;
          std::memcpy(row + j * sizeof(int64_t), &local, sizeof(int64_t));
          std::memcpy(row + k * sizeof(int64_t) + j * sizeof(float), &w, sizeof(float));
        }
      }
    }
  });
  return {send_buf, send_pos};
}

// Splits each row of buf into the column segments outs[i] (uint8 [N, w_i], widths summing to
// the row size), in place: the async dispatch fills tensors it returned earlier.
void moe_unpack_rows_cpu(const at::Tensor& buf, at::TensorList outs) {
  TORCH_CHECK(buf.dim() == 2 && buf.is_contiguous() && buf.scalar_type() == at::kByte,
              "moe_unpack_rows: buf must be a contiguous uint8 matrix");
  const int64_t n = buf.size(0), row_bytes = buf.size(1);
  std::vector<uint8_t*> dst;
  std::vector<int64_t> widths;
  int64_t total = 0;
  for (const auto& o : outs) {
    check_byte_matrix(o, n, "moe_unpack_rows: out");
    dst.push_back(o.data_ptr<uint8_t>());
    widths.push_back(o.size(1));
    total += o.size(1);
  }
  TORCH_CHECK(total == row_bytes, "moe_unpack_rows: segment widths sum to ", total, ", rows have ", row_bytes, " bytes");
  const uint8_t* in = buf.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = in + i * row_bytes;
      for (size_t s = 0; s < dst.size(); ++s) {
        std::memcpy(dst[s] + i * widths[s], row, widths[s]);
        row += widths[s];
      }
    }
  });
}

// out[t] = sum over ranks r (in rank order) of recv[send_pos[t, r]], accumulated in FP32; zero for
// a token sent nowhere. Writes into `out` so that an async combine fills the tensor it returned.
void moe_combine_reduce_cpu(const at::Tensor& recv, const at::Tensor& send_pos, const at::Tensor& out) {
  TORCH_CHECK(recv.dim() == 2 && recv.is_contiguous(), "moe_combine_reduce: recv must be a contiguous [S, H] tensor");
  TORCH_CHECK(send_pos.dim() == 2 && send_pos.is_contiguous() && send_pos.scalar_type() == at::kLong,
              "moe_combine_reduce: send_pos must be a contiguous int64 [T, R] tensor");
  const int64_t s_count = recv.size(0), h = recv.size(1);
  const int64_t t_count = send_pos.size(0), num_ranks = send_pos.size(1);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == t_count && out.size(1) == h &&
                  out.scalar_type() == recv.scalar_type(),
              "moe_combine_reduce: out must be a contiguous [T, H] tensor of recv's dtype");
  const int64_t* pos = send_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < t_count * num_ranks; ++i)
    TORCH_CHECK(pos[i] < s_count, "moe_combine_reduce: send_pos entry ", pos[i], " past the ", s_count, " rows");
  if (out.numel() == 0) return;
  DSV3_DISPATCH_FLOAT_INPUTS(recv.scalar_type(), "moe_combine_reduce", [&] {
    const scalar_t* in = recv.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * num_ranks));
    at::parallel_for(0, t_count, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(h);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t r = 0; r < num_ranks; ++r) {
          const int64_t p = pos[t * num_ranks + r];
          if (p < 0) continue;
          const scalar_t* row = in + p * h;
          for (int64_t c = 0; c < h; ++c) acc[c] += static_cast<float>(row[c]);
        }
        for (int64_t c = 0; c < h; ++c) o[t * h + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("moe_dispatch_pack", &moe_dispatch_pack_cpu);
  m.impl("moe_unpack_rows", &moe_unpack_rows_cpu);
  m.impl("moe_combine_reduce", &moe_combine_reduce_cpu);
}

}  // namespace dsv3
