// CPU FP8 GEMM driver: one blocked, multi-threaded GEMM with DeepSeek-V3's FP32 promotion per
// 128-K block, and the four ops of gemm_ops.cpp built on it (grouped GEMMs call it per group).
//
// Data flow of one GEMM (A [M,K] @ B [N,K]^T):
//   1. A is decoded once to fp32 (value / 256), rows padded with zeros (+ one cache line of skew).
//   2. Tasks are kTileM x kTileN tiles of the output, spread over torch's thread pool. A task
//      walks K in chunks of kChunkK: it decodes its rows of B for the chunk into a buffer that
//      stays in L2, then for each 128-wide K block sweeps 4x3 micro-tiles (24 A rows at a time,
//      so the A and B rows of a block stay in L1); each micro-tile promotes its FP32 partial
//      with sa[m,kb] * sb[.,kb] * 256^2 into 8-lane running totals. With M <= kSmallM the task
//      instead streams B one row triplet at a time (long sequential reads, A stays in L1).
//   3. The totals' lanes are summed (+ C) and rounded once to d's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/cpu_features.h"
#include "gemm_cpu.h"
#include "gemm_kernels.h"

namespace dsv3 {
namespace gemm {
namespace {

void convert_portable(const uint8_t* src, int64_t n, float* dst) {
  static const std::vector<float> lut = [] {
    std::vector<float> t(256);
    for (int v = 0; v < 256; ++v) t[v] = e4m3_to_float_div256(static_cast<uint8_t>(v));
    return t;
  }();
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

template <int MR, int NR>
void tile_portable(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t len8, const float* scale,
                   float* tot, int64_t tot_rs) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float lanes[kLanes] = {};
      const float* ar = a + i * lda;
      const float* br = b + j * ldb;
      for (int64_t k = 0; k < len8; k += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += ar[k + l] * br[k + l];
      float* t = tot + i * tot_rs + j * kLanes;
      const float s = scale[i * kMaxNr + j];
      for (int l = 0; l < kLanes; ++l) t[l] += lanes[l] * s;
    }
}

}  // namespace

KernelSet portable_kernels() {
  return {&convert_portable,
          {{&tile_portable<1, 1>, &tile_portable<1, 2>, &tile_portable<1, 3>},
           {&tile_portable<2, 1>, &tile_portable<2, 2>, &tile_portable<2, 3>},
           {&tile_portable<3, 1>, &tile_portable<3, 2>, &tile_portable<3, 3>},
           {&tile_portable<4, 1>, &tile_portable<4, 2>, &tile_portable<4, 3>}}};
}

namespace {

// One GEMM on strided views: d[m, n] = c[m, n] + sum_kb promote(A[m, kb] . B[n, kb]).
struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const uint8_t* a = nullptr;  // a[i * lda + kk]
  int64_t lda = 0;
  const float* sa = nullptr;  // sa[i * ldsa + kb]
  int64_t ldsa = 0;
  const uint8_t* b = nullptr;  // b[j * ldb + kk]
  int64_t ldb = 0;
  const float* sb = nullptr;  // sb[(sb_per_row ? j : j / 128) * ldsb + kb]
  int64_t ldsb = 0;
  bool sb_per_row = false;
  const float* c = nullptr;  // optional, c[i * ldc + j]
  int64_t ldc = 0;
  void* d = nullptr;  // d[i * ldd + j], float or bf16
  int64_t ldd = 0;
  bool d_bf16 = false;
};

KernelSet active_kernels() { return active_cpu_isa() >= CpuIsa::kAvx2 ? avx2_kernels() : portable_kernels(); }

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

void store(const GemmArgs& g, int64_t i, int64_t j, float v) {
  if (g.c) v += g.c[i * g.ldc + j];
  if (g.d_bf16)
    static_cast<c10::BFloat16*>(g.d)[i * g.ldd + j] = c10::BFloat16(v);
  else
    static_cast<float*>(g.d)[i * g.ldd + j] = v;
}

constexpr int64_t kTileM = 96;   // output rows per task (B is decoded once per task and K chunk)
constexpr int64_t kTileN = 24;   // output columns per task (a multiple of kMaxNr)
constexpr int64_t kSubM = 24;    // rows per inner sweep: 24 A rows + 24 B rows of a K block fit L1
constexpr int64_t kChunkK = 1024;  // K columns decoded per visit of a B row (prefetch-friendly runs)
constexpr int64_t kSmallM = 8;   // up to this many rows, stream B rows one triplet at a time
// Row strides of the decoded A and B buffers get one extra cache line: with strides that are
// multiples of 4 KiB (K = 7168, the chunk of 1024) the 7 rows a micro-tile reads would all map
// to one L1 set and alias each other.
constexpr int64_t kSkew = 16;
constexpr int64_t kBufStride = kChunkK + kSkew;

// Decodes rows [r0, r0 + rows) of B, columns [k0, k0 + len), into buf (row stride kBufStride),
// zero padding each row to a multiple of 8.
void decode_b(const KernelSet& ks, const GemmArgs& g, int64_t r0, int64_t rows, int64_t k0, int64_t len, float* buf) {
  const int64_t len8 = round_up(len, kLanes);
  for (int64_t j = 0; j < rows; ++j) {
    float* row = buf + j * kBufStride;
    ks.convert(g.b + (r0 + j) * g.ldb + k0, len, row);
    std::fill(row + len, row + len8, 0.0f);
  }
}

void run_gemm(const GemmArgs& g) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    at::parallel_for(0, g.m, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < g.n; ++j) store(g, i, j, 0.0f);
    });
    return;
  }
  const KernelSet ks = active_kernels();
  const int64_t kp = round_up(g.k, kLanes) + kSkew;
  const float decode = kDecodeFactor * kDecodeFactor;

  // 1. A -> fp32 / 256, zero padded to kp columns.
  std::vector<float> a32(static_cast<size_t>(g.m * kp));
  at::parallel_for(0, g.m, std::max<int64_t>(1, 16384 / kp), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = a32.data() + i * kp;
      ks.convert(g.a + i * g.lda, g.k, row);
      std::fill(row + g.k, row + kp, 0.0f);
    }
  });

  // 2. Output tiles.
  const bool small = g.m <= kSmallM;
  const int64_t tile_m = small ? g.m : kTileM;
  const int64_t tiles_m = (g.m + tile_m - 1) / tile_m, tiles_n = (g.n + kTileN - 1) / kTileN;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> bbuf(kTileN * kBufStride);
    std::vector<float> tot(kTileM * kTileN * kLanes);
    float scale[kMaxMr * kMaxNr];
    // One micro-tile over K block kb (columns k0..): B rows j.. of the task live in b_rows.
    auto micro = [&](int64_t m0, int64_t n0, int64_t i, int64_t mr, int64_t j, int64_t nr, int64_t kb, int64_t k0,
                     const float* b_rows) {
      const int64_t len8 = round_up(std::min(kBlockK, g.k - k0), kLanes);
      float sbv[kMaxNr];
      for (int64_t jr = 0; jr < nr; ++jr) {
        const int64_t n = n0 + j + jr;
        sbv[jr] = g.sb[(g.sb_per_row ? n : n / kBlockK) * g.ldsb + kb] * decode;
      }
      for (int64_t ir = 0; ir < mr; ++ir) {
        const float sa = g.sa[(m0 + i + ir) * g.ldsa + kb];
        for (int64_t jr = 0; jr < nr; ++jr) scale[ir * kMaxNr + jr] = sa * sbv[jr];
      }
      ks.tile[mr - 1][nr - 1](a32.data() + (m0 + i) * kp + k0, kp, b_rows, kBufStride, len8, scale,
                              tot.data() + (i * kTileN + j) * kLanes, kTileN * kLanes);
    };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / tiles_n) * tile_m, n0 = (t % tiles_n) * kTileN;
      const int64_t mb = std::min(tile_m, g.m - m0), nb = std::min(kTileN, g.n - n0);
      std::fill(tot.begin(), tot.begin() + mb * kTileN * kLanes, 0.0f);
      for (int64_t c0 = 0; c0 < g.k; c0 += kChunkK) {
        const int64_t clen = std::min(kChunkK, g.k - c0);
        if (small) {  // few A rows: stream each B row triplet through the whole chunk
          for (int64_t j = 0; j < nb; j += kMaxNr) {
            const int64_t nr = std::min<int64_t>(kMaxNr, nb - j);
            decode_b(ks, g, n0 + j, nr, c0, clen, bbuf.data());
            for (int64_t k0 = c0; k0 < c0 + clen; k0 += kBlockK)
              for (int64_t i = 0; i < mb; i += kMaxMr)
                micro(m0, n0, i, std::min<int64_t>(kMaxMr, mb - i), j, nr, k0 / kBlockK, k0, bbuf.data() + (k0 - c0));
          }
          continue;
        }
        decode_b(ks, g, n0, nb, c0, clen, bbuf.data());
        for (int64_t k0 = c0; k0 < c0 + clen; k0 += kBlockK)
          for (int64_t s0 = 0; s0 < mb; s0 += kSubM)
            for (int64_t j = 0; j < nb; j += kMaxNr) {
              const int64_t nr = std::min<int64_t>(kMaxNr, nb - j);
              for (int64_t i = s0; i < std::min(mb, s0 + kSubM); i += kMaxMr)
                micro(m0, n0, i, std::min<int64_t>(kMaxMr, mb - i), j, nr, k0 / kBlockK, k0,
                      bbuf.data() + j * kBufStride + (k0 - c0));
            }
      }
      // 3. Sum the lanes of each running total, add C, round once.
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t j = 0; j < nb; ++j) {
          const float* lanes = tot.data() + (i * kTileN + j) * kLanes;
          float s = 0.0f;
          for (int l = 0; l < kLanes; ++l) s += lanes[l];
          store(g, m0 + i, n0 + j, s);
        }
    }
  });
}

// ---- argument checks shared by the ops (Python checked them first; never trust a shape) ----

void check_fp8(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat8_e4m3fn, name, ": expected float8_e4m3fn, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_out(const at::Tensor& d, const char* name, at::IntArrayRef shape, bool f32_only) {
  TORCH_CHECK(d.scalar_type() == at::kFloat || (!f32_only && d.scalar_type() == at::kBFloat16), name,
              ": expected ", f32_only ? "float32" : "bfloat16 or float32", ", got ", d.scalar_type());
  TORCH_CHECK(d.sizes() == shape, name, ": expected shape ", shape, ", got ", d.sizes());
  TORCH_CHECK(d.is_contiguous(), name, ": expected a contiguous tensor");
}

// The B scale layout: true for 1x128 per-row tiles [.., N, kb], false for 128x128 blocks.
bool sb_layout_per_row(const at::Tensor& sb, int64_t n, int64_t num_kb, const char* name) {
  const int64_t rows = sb.size(-2);
  TORCH_CHECK(sb.size(-1) == num_kb && (rows == n || rows == (n + kBlockK - 1) / kBlockK), name,
              ": expected [..., ceil(N/128) or N, ceil(K/128)] with N=", n, ", ceil(K/128)=", num_kb, ", got ",
              sb.sizes());
  TORCH_CHECK(sb.scalar_type() == at::kFloat && sb.is_contiguous(), name, ": expected contiguous float32");
  return rows == n;
}

inline int64_t cdiv(int64_t x, int64_t y) { return (x + y - 1) / y; }

const uint8_t* bytes(const at::Tensor& t) { return reinterpret_cast<const uint8_t*>(t.data_ptr()); }

}  // namespace
}  // namespace gemm

using gemm::cdiv;
using gemm::kBlockK;

void fp8_gemm_nt_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                         const std::optional<at::Tensor>& c, const at::Tensor& d) {
  gemm::check_fp8(a, "fp8_gemm_nt: a", 2);
  gemm::check_fp8(b, "fp8_gemm_nt: b", 2);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0), num_kb = cdiv(k, kBlockK);
  TORCH_CHECK(b.size(1) == k, "fp8_gemm_nt: b has K=", b.size(1), " but a has K=", k);
  gemm::check_f32(sa, "fp8_gemm_nt: sa", {m, num_kb});
  TORCH_CHECK(sb.dim() == 2, "fp8_gemm_nt: sb must be 2-D");
  const bool per_row = gemm::sb_layout_per_row(sb, n, num_kb, "fp8_gemm_nt: sb");
  gemm::check_out(d, "fp8_gemm_nt: d", {m, n}, c.has_value());
  if (c) gemm::check_f32(*c, "fp8_gemm_nt: c", {m, n});

  gemm::GemmArgs g;
  g.m = m, g.n = n, g.k = k;
  g.a = gemm::bytes(a), g.lda = k, g.sa = sa.data_ptr<float>(), g.ldsa = num_kb;
  g.b = gemm::bytes(b), g.ldb = k, g.sb = sb.data_ptr<float>(), g.ldsb = num_kb, g.sb_per_row = per_row;
  if (c) g.c = c->data_ptr<float>(), g.ldc = n;
  g.d = d.data_ptr(), g.ldd = n, g.d_bf16 = d.scalar_type() == at::kBFloat16;
  gemm::run_gemm(g);
}

void m_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, const at::Tensor& m_indices, const at::Tensor& d) {
  gemm::check_fp8(a, "m_grouped_fp8_gemm_nt_contiguous: a", 2);
  gemm::check_fp8(b, "m_grouped_fp8_gemm_nt_contiguous: b", 3);
  const int64_t m = a.size(0), k = a.size(1), groups = b.size(0), n = b.size(1), num_kb = cdiv(k, kBlockK);
  TORCH_CHECK(b.size(2) == k, "m_grouped_fp8_gemm_nt_contiguous: b has K=", b.size(2), " but a has K=", k);
  gemm::check_f32(sa, "m_grouped_fp8_gemm_nt_contiguous: sa", {m, num_kb});
  TORCH_CHECK(sb.dim() == 3 && sb.size(0) == groups, "m_grouped_fp8_gemm_nt_contiguous: sb must be [G, ..., ...]");
  const bool per_row = gemm::sb_layout_per_row(sb, n, num_kb, "m_grouped_fp8_gemm_nt_contiguous: sb");
  TORCH_CHECK(m_indices.scalar_type() == at::kInt && m_indices.dim() == 1 && m_indices.size(0) == m &&
                  m_indices.is_contiguous(),
              "m_grouped_fp8_gemm_nt_contiguous: m_indices must be a contiguous int32 [M] tensor");
  gemm::check_out(d, "m_grouped_fp8_gemm_nt_contiguous: d", {m, n}, false);

  const int32_t* idx = m_indices.data_ptr<int32_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(idx[i] >= -1 && idx[i] < groups, "m_grouped_fp8_gemm_nt_contiguous: m_indices[", i, "]=", idx[i],
                " is outside [-1, ", groups, ")");
  const bool bf16 = d.scalar_type() == at::kBFloat16;
  const int64_t sb_rows = sb.size(1);
  for (int64_t r0 = 0; r0 < m;) {  // one GEMM per run of equal indices
    int64_t r1 = r0 + 1;
    while (r1 < m && idx[r1] == idx[r0]) ++r1;
    if (idx[r0] < 0) {
      d.narrow(0, r0, r1 - r0).zero_();
    } else {
      const int64_t e = idx[r0];
      gemm::GemmArgs g;
      g.m = r1 - r0, g.n = n, g.k = k;
      g.a = gemm::bytes(a) + r0 * k, g.lda = k, g.sa = sa.data_ptr<float>() + r0 * num_kb, g.ldsa = num_kb;
      g.b = gemm::bytes(b) + e * n * k, g.ldb = k;
      g.sb = sb.data_ptr<float>() + e * sb_rows * num_kb, g.ldsb = num_kb, g.sb_per_row = per_row;
      g.d = static_cast<char*>(d.data_ptr()) + r0 * n * d.element_size(), g.ldd = n, g.d_bf16 = bf16;
      gemm::run_gemm(g);
    }
    r0 = r1;
  }
}

void m_grouped_fp8_gemm_nt_masked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                          const at::Tensor& sb, const at::Tensor& masked_m, int64_t /*expected_m*/,
                                          const at::Tensor& d) {
  gemm::check_fp8(a, "m_grouped_fp8_gemm_nt_masked: a", 3);
  gemm::check_fp8(b, "m_grouped_fp8_gemm_nt_masked: b", 3);
  const int64_t groups = a.size(0), mmax = a.size(1), k = a.size(2), n = b.size(1), num_kb = cdiv(k, kBlockK);
  TORCH_CHECK(b.size(0) == groups && b.size(2) == k, "m_grouped_fp8_gemm_nt_masked: b must be [G=", groups,
              ", N, K=", k, "], got ", b.sizes());
  gemm::check_f32(sa, "m_grouped_fp8_gemm_nt_masked: sa", {groups, mmax, num_kb});
  TORCH_CHECK(sb.dim() == 3 && sb.size(0) == groups, "m_grouped_fp8_gemm_nt_masked: sb must be [G, ..., ...]");
  const bool per_row = gemm::sb_layout_per_row(sb, n, num_kb, "m_grouped_fp8_gemm_nt_masked: sb");
  TORCH_CHECK(masked_m.scalar_type() == at::kInt && masked_m.dim() == 1 && masked_m.size(0) == groups &&
                  masked_m.is_contiguous(),
              "m_grouped_fp8_gemm_nt_masked: masked_m must be a contiguous int32 [G] tensor");
  gemm::check_out(d, "m_grouped_fp8_gemm_nt_masked: d", {groups, mmax, n}, false);
  const int32_t* mm = masked_m.data_ptr<int32_t>();
  const int64_t sb_rows = sb.size(1);
  for (int64_t e = 0; e < groups; ++e) {
    TORCH_CHECK(mm[e] >= 0 && mm[e] <= mmax, "m_grouped_fp8_gemm_nt_masked: masked_m[", e, "]=", mm[e],
                " is outside [0, ", mmax, "]");
    gemm::GemmArgs g;
    g.m = mm[e], g.n = n, g.k = k;
    g.a = gemm::bytes(a) + e * mmax * k, g.lda = k, g.sa = sa.data_ptr<float>() + e * mmax * num_kb, g.ldsa = num_kb;
    g.b = gemm::bytes(b) + e * n * k, g.ldb = k;
    g.sb = sb.data_ptr<float>() + e * sb_rows * num_kb, g.ldsb = num_kb, g.sb_per_row = per_row;
    g.d = static_cast<char*>(d.data_ptr()) + e * mmax * n * d.element_size(), g.ldd = n;
    g.d_bf16 = d.scalar_type() == at::kBFloat16;
    gemm::run_gemm(g);
  }
}

void k_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, at::IntArrayRef ks,
                                              const std::optional<at::Tensor>& c, const at::Tensor& d) {
  gemm::check_fp8(a, "k_grouped_fp8_gemm_nt_contiguous: a", 2);
  gemm::check_fp8(b, "k_grouped_fp8_gemm_nt_contiguous: b", 2);
  const int64_t m = a.size(0), sum_k = a.size(1), n = b.size(0), groups = static_cast<int64_t>(ks.size());
  int64_t total = 0, tiles = 0;
  for (int64_t kg : ks) {
    TORCH_CHECK(kg >= 0, "k_grouped_fp8_gemm_nt_contiguous: ks must be >= 0, got ", kg);
    total += kg, tiles += cdiv(kg, kBlockK);
  }
  TORCH_CHECK(total == sum_k, "k_grouped_fp8_gemm_nt_contiguous: sum(ks)=", total, " but a has ", sum_k, " columns");
  TORCH_CHECK(b.size(1) == sum_k, "k_grouped_fp8_gemm_nt_contiguous: b has ", b.size(1), " columns, a has ", sum_k);
  gemm::check_f32(sa, "k_grouped_fp8_gemm_nt_contiguous: sa", {m, tiles});
  gemm::check_f32(sb, "k_grouped_fp8_gemm_nt_contiguous: sb", {n, tiles});
  gemm::check_out(d, "k_grouped_fp8_gemm_nt_contiguous: d", {groups, m, n}, false);
  if (c) gemm::check_f32(*c, "k_grouped_fp8_gemm_nt_contiguous: c", {groups, m, n});
  int64_t k0 = 0, s0 = 0;
  for (int64_t e = 0; e < groups; ++e) {
    gemm::GemmArgs g;
    g.m = m, g.n = n, g.k = ks[e];
    g.a = gemm::bytes(a) + k0, g.lda = sum_k, g.sa = sa.data_ptr<float>() + s0, g.ldsa = tiles;
    g.b = gemm::bytes(b) + k0, g.ldb = sum_k, g.sb = sb.data_ptr<float>() + s0, g.ldsb = tiles, g.sb_per_row = true;
    if (c) g.c = c->data_ptr<float>() + e * m * n, g.ldc = n;
    g.d = static_cast<char*>(d.data_ptr()) + e * m * n * d.element_size(), g.ldd = n;
    g.d_bf16 = d.scalar_type() == at::kBFloat16;
    gemm::run_gemm(g);
    k0 += ks[e], s0 += cdiv(ks[e], kBlockK);
  }
}

}  // namespace dsv3
