// Packing of the dispatch send buffers, unpacking, and the combine's reduction, on the CPU.
//
// A send buffer is a uint8 matrix [S, row_bytes]: one row per (token, destination rank) pair
// with is_token_in_rank set, ordered by destination rank and then by token index
// (moe_send_positions), so that each destination's rows are one contiguous split of a
// variable-size all-to-all. A row holds the token's payload bytes (any dtype, viewed as uint8)
// and, when top-k metadata travels, k int64 expert indices made local to the destination (-1
// where the expert lives elsewhere) and k float32 weights (0.0 at those positions). The Buffer
// packs the main payload alone (its receive buffer is then the returned tensor itself, with no
// unpack) and the small parts (FP8 scales, top-k) into a second buffer.
//
// send_pos [T, R] int64 records where each (token, rank) row went (-1 if not sent): the combine
// reads the returning rows back through it and sums them in at::opmath_type (FP32, or FP64 for
// float64 rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/cpu_features.h"
#include "comm_checks.h"
#include "rows.h"

namespace dsv3 {
namespace {

void check_byte_matrix(const at::Tensor& t, int64_t rows, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kByte, what,
              ": expected a contiguous uint8 matrix");
  TORCH_CHECK(t.size(0) == rows, what, ": expected ", rows, " rows, got ", t.size(0));
}

// Row of each (token, rank) in the send buffer: destination rank major, token index minor; -1
// where is_token_in_rank is false.
at::Tensor moe_send_positions_cpu(const at::Tensor& is_token_in_rank) {
  TORCH_CHECK(is_token_in_rank.dim() == 2 && is_token_in_rank.is_contiguous() &&
                  is_token_in_rank.scalar_type() == at::kBool,
              "moe_send_positions: is_token_in_rank must be a contiguous bool [T, R] tensor");
  const int64_t t_count = is_token_in_rank.size(0), num_ranks = is_token_in_rank.size(1);
  const bool* in_rank = is_token_in_rank.data_ptr<bool>();
  auto send_pos = at::empty({t_count, num_ranks}, is_token_in_rank.options().dtype(at::kLong));
  int64_t* pos = send_pos.data_ptr<int64_t>();
  std::vector<int64_t> next(num_ranks, 0);  // first the counts, then the running row of each rank
  for (int64_t i = 0; i < t_count * num_ranks; ++i) next[i % num_ranks] += in_rank[i] ? 1 : 0;
  for (int64_t r = 0, offset = 0; r < num_ranks; ++r) {
    const int64_t c = next[r];
    next[r] = offset;
    offset += c;
  }
  for (int64_t t = 0; t < t_count; ++t)
    for (int64_t r = 0; r < num_ranks; ++r) pos[t * num_ranks + r] = in_rank[t * num_ranks + r] ? next[r]++ : -1;
  return send_pos;
}

// Writes row send_pos[t, r] of `out` for every sent (token, rank): the payloads' bytes of token t,
// then (with top-k) its k expert indices made local to rank r and their weights. Rows of `out`
// that no (token, rank) names are left as they are. `out` may be a reused scratch buffer.
void moe_dispatch_pack_cpu(at::TensorList payloads, const at::Tensor& send_pos,
                           const c10::optional<at::Tensor>& topk_idx, const c10::optional<at::Tensor>& topk_weights,
                           int64_t experts_per_rank, int64_t expert_base, const at::Tensor& out) {
  const int64_t k = comm_checks::pack_args(payloads, send_pos, topk_idx, topk_weights, experts_per_rank, out);
  const int64_t t_count = send_pos.size(0), num_ranks = send_pos.size(1);
  const int64_t s_count = out.size(0), row_bytes = out.size(1);
  const int64_t* pos = send_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < t_count * num_ranks; ++i)
    TORCH_CHECK(pos[i] >= -1 && pos[i] < s_count, "moe_dispatch_pack: send_pos entry ", pos[i], " outside [-1, ",
                s_count, ")");
  std::vector<const uint8_t*> src;
  std::vector<int64_t> widths;
  for (const auto& p : payloads) {
    src.push_back(p.data_ptr<uint8_t>());
    widths.push_back(p.size(1));
  }
  const int64_t* idx = k ? topk_idx->data_ptr<int64_t>() : nullptr;
  const float* wts = k ? topk_weights->data_ptr<float>() : nullptr;
  uint8_t* dst = out.data_ptr<uint8_t>();
  const bool avx2 = active_cpu_isa() >= CpuIsa::kAvx2;
  const auto copy_row = avx2 ? &copy_row_avx2 : &copy_row_portable;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_bytes * num_ranks));
  at::parallel_for(0, t_count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < num_ranks; ++r) {
        const int64_t p = pos[t * num_ranks + r];
        if (p < 0) continue;
        uint8_t* row = dst + p * row_bytes;
        for (size_t i = 0; i < src.size(); ++i) {
          copy_row(row, src[i] + t * widths[i], widths[i]);
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
    if (avx2) copy_rows_done_avx2();  // streamed rows are visible before the exchange reads them
  });
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

template <typename T>
using SumRowsFn = void (*)(const T* const*, int64_t, int64_t, T*);

// The per-token sum for this dtype and the active instruction set (rows.h).
template <typename T>
SumRowsFn<T> pick_sum_rows() {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (active_cpu_isa() >= CpuIsa::kAvx2) return &sum_rows_avx2<T>;
  }
  return &sum_rows_portable<T>;
}

// out[t] = sum over ranks r (in rank order) of recv[send_pos[t, r]], accumulated in FP32 (FP64 for
// float64); zero for a token sent nowhere. One pass: each token's rows are read once and its
// output row written once. Writes into `out` so that an async combine fills the tensor it returned.
void moe_combine_reduce_cpu(const at::Tensor& recv, const at::Tensor& send_pos, const at::Tensor& out) {
  comm_checks::combine_reduce_args(recv, send_pos, out);
  const int64_t s_count = recv.size(0), h = recv.size(1);
  const int64_t t_count = send_pos.size(0), num_ranks = send_pos.size(1);
  const int64_t* pos = send_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < t_count * num_ranks; ++i)
    TORCH_CHECK(pos[i] < s_count, "moe_combine_reduce: send_pos entry ", pos[i], " past the ", s_count, " rows");
  if (out.numel() == 0) return;
  DSV3_DISPATCH_COMM_FLOATS(recv.scalar_type(), "moe_combine_reduce", [&] {
    const SumRowsFn<scalar_t> sum_rows = pick_sum_rows<scalar_t>();
    const scalar_t* in = recv.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * num_ranks));
    at::parallel_for(0, t_count, grain, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> rows(num_ranks);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t* p = pos + t * num_ranks;
        int64_t n = 0;
        for (int64_t r = 0; r < num_ranks; ++r)
          if (p[r] >= 0) rows[n++] = in + p[r] * h;
        if (n == 0)  // sent nowhere: zeros
          std::fill(o + t * h, o + (t + 1) * h, static_cast<scalar_t>(0));
        else
          sum_rows(rows.data(), n, h, o + t * h);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("moe_send_positions", &moe_send_positions_cpu);
  m.impl("moe_dispatch_pack", &moe_dispatch_pack_cpu);
  m.impl("moe_unpack_rows", &moe_unpack_rows_cpu);
  m.impl("moe_combine_reduce", &moe_combine_reduce_cpu);
}

}  // namespace dsv3
