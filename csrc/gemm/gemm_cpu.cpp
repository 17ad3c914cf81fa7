// CPU FP8 GEMM driver: one blocked, multi-threaded GEMM with DeepSeek-V3's FP32 promotion per
// 128-K block, and the ops of gemm_ops.cpp built on it (grouped GEMMs call it per group).
//
// Two paths, sharing the building blocks of gemm_kernels.h (portable, AVX2 or AVX-512, as
// active_cpu_isa() allows: cpuid, capped by set_cpu_isa / DSV3_CPU_ISA):
//   * packed (M > kGemvMaxM, compute-bound): B, one slab of kSlabN columns at a time, is decoded
//     (value / 256) into K-interleaved fp32 panels of kNr columns (register transposes).
//     A task is a kTileM-row tile of A against one or more kTileN-column tiles of the slab; its
//     worker decodes the tile's A rows into its own scratch (once while it stays on the tile).
//     Per output tile it walks K in chunks of kChunkK and, for each B panel chunk (kept in L1),
//     sweeps its kMr-row groups of A (kept in L2) with the micro-kernel, which runs every 128-K
//     block of the chunk in registers and promotes each block's partial into the task's FP32 C
//     tile with the A and B scales of the block.
//     A weight packed once by fp8_prepack_b (ops.prepack_fp8_weight) holds all of these panels
//     (per group for the grouped GEMMs' [G, N, K] weights): then no slab is decoded per call (a
//     third of the work at M = 17, N = K = 7168). Both are made by decode_b_panels.
//   * GEMV (M <= kGemvMaxM, memory-bound): A is packed once (gemv_pack_a); tasks stream groups of
//     kGemvRows B rows, each vector (32 or 64 bytes) decoded in registers once per kGemvMr rows of A
//     (B's bytes are read from memory once: half the bytes of a BF16 weight).
// Where active_cpu_isa() reaches AMX, the packed path runs on AMX-BF16 tiles instead
// (run_packed_amx: gemm_amx_driver.h, gemm_amx.cpp), except with pre-packed weights, whose fp32
// panels stay on the AVX-512 micro-kernels.
// The FP32 totals (+ C) are rounded once to d's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../common/cpu_features.h"
#include "gemm_amx_driver.h"
#include "gemm_cpu.h"
#include "gemm_kernels.h"

namespace dsv3 {
namespace gemm {
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
  // Optional: all of B already decoded into the packed path's panels by fp8_prepack_b_cpu
  // (panel p, column kk, lane r at b_panels[(p * k + kk) * kNr + r]); then no slab is decoded.
  const float* b_panels = nullptr;

  const float* sb_row(int64_t j) const { return sb + (sb_per_row ? j : j / kBlockK) * ldsb; }
};

KernelSet active_kernels() {
  const CpuIsa isa = active_cpu_isa();
  return isa >= CpuIsa::kAvx512 ? avx512_kernels() : isa >= CpuIsa::kAvx2 ? avx2_kernels() : portable_kernels();
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
inline int64_t cdiv(int64_t x, int64_t y) { return (x + y - 1) / y; }

void store(const GemmArgs& g, int64_t i, int64_t j, float v) {
  if (g.c) v += g.c[i * g.ldc + j];
  if (g.d_bf16)
    static_cast<c10::BFloat16*>(g.d)[i * g.ldd + j] = c10::BFloat16(v);
  else
    static_cast<float*>(g.d)[i * g.ldd + j] = v;
}

constexpr int64_t kGemvMaxM = 16;  // up to this many rows of A, the GEMV path
constexpr int64_t kTileM = 16 * kMr;   // output rows per task: 16 A panels (96 KB per K chunk, L2)
constexpr int64_t kTileN = 8 * kNr;    // output columns per task: 8 B panels
constexpr int64_t kSlabN = 32 * kNr;  // B columns decoded at a time (7168 x 512 fp32: 15 MB, L3)
constexpr int64_t kChunkK = 2 * kBlockK;  // K per micro-kernel call: a B panel chunk is 16 KB (L1)
constexpr int64_t kTileLd = kTileN + 16;  // C tile row stride (+ a cache line: no 1 KiB aliasing)
// Decoded A rows get one extra cache line of stride: with strides that are
// multiples of 4 KiB (K = 7168) the rows would all map to one L1 set.
constexpr int64_t kSkew = 16;

float* floats(at::Tensor& t) { return t.data_ptr<float>(); }

// Runs body(w) for w in [0, workers) concurrently, one worker per thread (setup.py compiles with
// -fopenmp where torch uses OpenMP: at::parallel_for is header code and would run serially without).
template <typename Body>
void run_workers(int64_t workers, const Body& body) {
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) body(w);
  });
}

// The number of threads to use: torch's intra-op setting, one inside another op's parallel region.
int64_t num_workers(int64_t tasks) {
  return at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
}

// Runs fn(t, scratch) for t in [0, n) on up to at::get_num_threads() threads, handing tasks out
// one at a time from a shared counter: on a shared (oversubscribed) machine a descheduled thread
// then delays the call by at most one task, where a static split would leave the others waiting
// for its half. scratch: scratch_floats floats per worker thread.
template <typename Fn>
void parallel_tasks(int64_t n, int64_t scratch_floats, const Fn& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  run_workers(num_workers(n), [&](int64_t) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, scratch.data());
  });
}

// Decodes `panels` kNr-row panels of B [n, k] (row j at b + j * ldb), starting at row j0, into
// the packed path's K-interleaved fp32 layout: panel p at dst + p * k * kNr, element (kk, r) =
// e4m3(B[j0 + p * kNr + r, kk]) / 256, zeros for rows past n. One task per panel. Both the GEMM's
// per-call slabs and fp8_prepack_b's one-time panels are made here, so they hold the same bits.
void decode_b_panels(const KernelSet& ks, const uint8_t* b, int64_t ldb, int64_t n, int64_t k, int64_t j0,
                     int64_t panels, float* dst) {
  parallel_tasks(panels, 0, [&](int64_t p, float*) {
    const int64_t j = j0 + p * kNr;
    const int rows = static_cast<int>(std::min<int64_t>(kNr, n - j));
    for (int64_t c0 = 0; c0 < k; c0 += kChunkK)
      ks.pack_b(b + j * ldb, ldb, rows, c0, std::min(kChunkK, k - c0), dst + (p * k + c0) * kNr);
  });
}

void run_packed(const GemmArgs& g, const KernelSet& ks) {
  const int64_t num_kb = cdiv(g.k, kBlockK);
  const int64_t panels_a = cdiv(g.m, kMr), panels_b = cdiv(g.n, kNr);
  const int64_t lda = round_up(g.k, 8) + kSkew;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // The scales of every A and B panel and K block.
  at::Tensor asc = at::empty({panels_a * num_kb * kMr}, f32), bsc = at::empty({panels_b * num_kb * kNr}, f32);
  float *pas = floats(asc), *pbs = floats(bsc);
  for (int64_t p = 0; p < panels_a; ++p)
    pack_scales(p, g.m, num_kb, kMr, pas, [&](int64_t i, int64_t kb) { return g.sa[i * g.ldsa + kb]; });
  for (int64_t p = 0; p < panels_b; ++p)
    pack_scales(p, g.n, num_kb, kNr, pbs, [&](int64_t j, int64_t kb) { return g.sb_row(j)[kb] * kDecodeScale; });

  // Tasks: an A row tile (kTileM rows) against `group` column tiles of the current B slab.
  // Each worker decodes the A rows of its tile from FP8 into its own scratch (kept while it
  // stays on that tile, across slabs): no M x K fp32 copy of A, and every thread decodes in
  // parallel. Groups are as wide as the task count allows (>= 4 tasks per worker per slab).
  const int64_t tiles_m = cdiv(g.m, kTileM), slab_tiles = cdiv(std::min(kSlabN, g.n), kTileN);
  const int64_t workers = num_workers(tiles_m * slab_tiles);
  const int64_t group = std::max<int64_t>(1, std::min(slab_tiles, tiles_m * slab_tiles / (4 * workers)));
  const int64_t per_worker = kTileM * lda + kTileM * kTileLd;
  at::Tensor scratch = at::empty({workers * per_worker}, f32);
  std::vector<int64_t> decoded(static_cast<size_t>(workers), -1);  // the A tile in each worker's scratch

  // B, one slab of kSlabN columns at a time (L3-sized, reused): decoded into K-interleaved
  // kNr-column panels, then every task of the slab.
  // (With g.b_panels, B was decoded once by fp8_prepack_b_cpu: the slab is a view of it.)
  at::Tensor slab = g.b_panels ? at::Tensor() : at::empty({std::min(panels_b, kSlabN / kNr) * g.k * kNr}, f32);
  float* slab_data = g.b_panels ? nullptr : floats(slab);
  for (int64_t s0 = 0; s0 < g.n; s0 += kSlabN) {
    const int64_t sn = std::min(kSlabN, g.n - s0), sp = cdiv(sn, kNr), tiles_n = cdiv(sn, kTileN);
    const float* pb = g.b_panels ? g.b_panels + (s0 / kNr) * g.k * kNr : slab_data;
    if (!g.b_panels) decode_b_panels(ks, g.b, g.ldb, g.n, g.k, s0, sp, slab_data);
    const int64_t groups_n = cdiv(tiles_n, group), tasks = tiles_m * groups_n;
    std::atomic<int64_t> next{0};
    run_workers(std::min(workers, tasks), [&](int64_t w) {
      float* a_rows = floats(scratch) + w * per_worker;  // decoded A rows of the tile, row r at r * lda
      float* tile = a_rows + kTileM * lda;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        const int64_t tm = t / groups_n, m0 = tm * kTileM, mb = std::min(kTileM, g.m - m0), mp = cdiv(mb, kMr);
        if (decoded[w] != tm) {
          for (int64_t r = 0; r < mp * kMr; ++r)
            if (r < mb)
              ks.convert(g.a + (m0 + r) * g.lda, g.k, a_rows + r * lda);
            else
              std::fill(a_rows + r * lda, a_rows + r * lda + g.k, 0.0f);
          decoded[w] = tm;
        }
        const int64_t tn0 = (t % groups_n) * group;
        for (int64_t tn = tn0; tn < std::min(tiles_n, tn0 + group); ++tn) {
          const int64_t n0 = tn * kTileN, nb = std::min(kTileN, sn - n0), np = cdiv(nb, kNr);  // n0 within the slab
          std::fill(tile, tile + mp * kMr * kTileLd, 0.0f);
          for (int64_t c0 = 0; c0 < g.k; c0 += kChunkK) {
            const int64_t c1 = std::min(g.k, c0 + kChunkK);
            for (int64_t jr = 0; jr < np; ++jr) {
              const int64_t sp_j = n0 / kNr + jr;  // panel within the slab
              const float* bpanel = pb + (sp_j * g.k + c0) * kNr;
              const float* bscale = pbs + ((s0 / kNr) + sp_j) * num_kb * kNr;
              for (int64_t ir = 0; ir < mp; ++ir)
                ks.micro(a_rows + ir * kMr * lda + c0, lda, bpanel, c0, c1, pas + (m0 / kMr + ir) * num_kb * kMr,
                         bscale, tile + ir * kMr * kTileLd + jr * kNr, kTileLd);
            }
          }
          for (int64_t i = 0; i < mb; ++i)
            for (int64_t j = 0; j < nb; ++j) store(g, m0 + i, s0 + n0 + j, tile[i * kTileLd + j]);
        }
      }
    });
  }
}

void run_gemv(const GemmArgs& g, const KernelSet& ks) {
  // 1. A, packed once in the kernel set's GEMV layout (rows zero padded to kGemvAlign).
  const int64_t lda = round_up(g.k, kGemvAlign) + kSkew;
  std::vector<float> a32(static_cast<size_t>(g.m * lda));
  for (int64_t i = 0; i < g.m; ++i) ks.gemv_pack_a(g.a + i * g.lda, g.k, a32.data() + i * lda);

  // 2. Groups of kGemvRows B rows, each decoded once per kGemvMr rows of A. A task is a whole
  // number of kGemvTaskCols-column units of d (32 bf16 outputs are 64 bytes: where d's rows are
  // 64-byte aligned, two threads never write one cache line of d) and streams >= 64 KiB of B,
  // unless that leaves fewer than 4 tasks per thread (small N on many threads, e.g. N = 576):
  // then tasks are finer (each output is written once, so a shared line costs one miss).
  const int64_t groups = cdiv(g.n, kGemvRows);
  constexpr int64_t kGemvTaskCols = 32 * kGemvRows;  // a multiple of 32 columns and of kGemvRows
  int64_t per_task = kGemvTaskCols / kGemvRows * cdiv(65536, kGemvTaskCols * g.k);  // groups per task
  const int64_t min_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  if (cdiv(groups, per_task) < min_tasks) per_task = std::max<int64_t>(1, cdiv(groups, min_tasks));
  parallel_tasks(cdiv(groups, per_task), 0, [&](int64_t task, float*) {
    float out[kGemvMr * kGemvRows];
    const uint8_t* brow[kGemvRows];
    const float* srow[kGemvRows];
    for (int64_t q = task * per_task; q < std::min(groups, (task + 1) * per_task); ++q) {
      const int64_t n0 = q * kGemvRows;
      for (int r = 0; r < kGemvRows; ++r) {  // rows past N repeat the last one (results dropped)
        const int64_t j = std::min(n0 + r, g.n - 1);
        brow[r] = g.b + j * g.ldb;
        srow[r] = g.sb_row(j);
      }
      for (int64_t i0 = 0; i0 < g.m; i0 += kGemvMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kGemvMr, g.m - i0));
        ks.gemv(a32.data() + i0 * lda, lda, g.sa + i0 * g.ldsa, g.ldsa, mr, brow, srow, g.k, out, kGemvRows);
        for (int i = 0; i < mr; ++i)
          for (int r = 0; r < kGemvRows && n0 + r < g.n; ++r) store(g, i0 + i, n0 + r, out[i * kGemvRows + r]);
      }
    }
  });
}

// The packed GEMM on AMX-BF16 tiles (gemm_amx_driver.h: blocking; gemm_amx.cpp: kernels), on
// torch's thread pool.
void run_packed_amx(const GemmArgs& g) {
  const auto scale_a = [&](int64_t i, int64_t kb) { return g.sa[i * g.ldsa + kb]; };
  const auto scale_b = [&](int64_t j, int64_t kb) { return g.sb_row(j)[kb]; };
  const auto parallel = [](int64_t tasks, const auto& fn) {
    parallel_tasks(tasks, 0, [&](int64_t t, float*) { fn(t); });
  };
  run_amx_gemm(amx_kernels(), g.m, g.n, g.k, g.a, g.lda, g.b, g.ldb, scale_a, scale_b, parallel,
               [&](int64_t i, int64_t j, float v) { store(g, i, j, v); });
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
  if (g.m <= kGemvMaxM)
    run_gemv(g, ks);
  else if (active_cpu_isa() >= CpuIsa::kAmx && !g.b_panels)  // pre-packed fp32 panels: AVX-512 micro-kernels
    run_packed_amx(g);
  else
    run_packed(g, ks);
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

const uint8_t* bytes(const at::Tensor& t) { return reinterpret_cast<const uint8_t*>(t.data_ptr()); }

}  // namespace
}  // namespace gemm

using gemm::cdiv;
using gemm::kBlockK;

namespace gemm {
namespace {

// The checked arguments of one dense D = C + A @ B^T (the fp8_gemm_nt ops).
GemmArgs dense_args(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                    const std::optional<at::Tensor>& c, const at::Tensor& d) {
  check_fp8(a, "fp8_gemm_nt: a", 2);
  check_fp8(b, "fp8_gemm_nt: b", 2);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0), num_kb = cdiv(k, kBlockK);
  TORCH_CHECK(b.size(1) == k, "fp8_gemm_nt: b has K=", b.size(1), " but a has K=", k);
  check_f32(sa, "fp8_gemm_nt: sa", {m, num_kb});
  TORCH_CHECK(sb.dim() == 2, "fp8_gemm_nt: sb must be 2-D");
  const bool per_row = sb_layout_per_row(sb, n, num_kb, "fp8_gemm_nt: sb");
  check_out(d, "fp8_gemm_nt: d", {m, n}, c.has_value());
  if (c) check_f32(*c, "fp8_gemm_nt: c", {m, n});

  GemmArgs g;
  g.m = m, g.n = n, g.k = k;
  g.a = bytes(a), g.lda = k, g.sa = sa.data_ptr<float>(), g.ldsa = num_kb;
  g.b = bytes(b), g.ldb = k, g.sb = sb.data_ptr<float>(), g.ldsb = num_kb, g.sb_per_row = per_row;
  if (c) g.c = c->data_ptr<float>(), g.ldc = n;
  g.d = d.data_ptr(), g.ldd = n, g.d_bf16 = d.scalar_type() == at::kBFloat16;
  return g;
}

}  // namespace
}  // namespace gemm

void fp8_gemm_nt_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                         const std::optional<at::Tensor>& c, const at::Tensor& d) {
  gemm::run_gemm(gemm::dense_args(a, sa, b, sb, c, d));
}

at::Tensor fp8_prepack_b_cpu(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 || b.dim() == 3, "fp8_prepack_b: b must be [N, K] or [G, N, K], got ", b.sizes());
  gemm::check_fp8(b, "fp8_prepack_b: b", b.dim());
  const bool grouped = b.dim() == 3;
  const int64_t groups = grouped ? b.size(0) : 1, n = b.size(-2), k = b.size(-1), panels = cdiv(n, gemm::kNr);
  at::Tensor out = grouped ? at::empty({groups, panels, k, gemm::kNr}, b.options().dtype(at::kFloat))
                           : at::empty({panels, k, gemm::kNr}, b.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const gemm::KernelSet ks = gemm::active_kernels();  // every kernel set decodes to the same exact values
  float* dst = out.data_ptr<float>();
  for (int64_t e = 0; e < groups; ++e)  // each group is its own [N, K] weight (its panels start afresh)
    gemm::decode_b_panels(ks, gemm::bytes(b) + e * n * k, k, n, k, 0, panels, dst + e * panels * k * gemm::kNr);
  return out;
}

void fp8_gemm_nt_prepacked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                   const at::Tensor& sb, const at::Tensor& b_panels, const std::optional<at::Tensor>& c,
                                   const at::Tensor& d) {
  gemm::GemmArgs g = gemm::dense_args(a, sa, b, sb, c, d);
  gemm::check_f32(b_panels, "fp8_gemm_nt_prepacked: b_panels", {cdiv(g.n, gemm::kNr), g.k, gemm::kNr});
  g.b_panels = b_panels.data_ptr<float>();
  gemm::run_gemm(g);
}

namespace gemm {
namespace {

// The panels of a grouped weight packed by fp8_prepack_b ([G, ceil(N/kNr), K, kNr]; group e's
// start e * ceil(N/kNr) * K * kNr floats in), checked against b [G, N, K]; nullptr without panels.
const float* group_panels(const std::optional<at::Tensor>& b_panels, const at::Tensor& b, const char* name) {
  if (!b_panels) return nullptr;
  check_f32(*b_panels, name, {b.size(0), cdiv(b.size(1), kNr), b.size(2), kNr});
  return b_panels->data_ptr<float>();
}

void m_grouped_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                          const std::optional<at::Tensor>& b_panels, const at::Tensor& m_indices, const at::Tensor& d) {
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
  const float* panels = group_panels(b_panels, b, "m_grouped_fp8_gemm_nt_contiguous: b_panels");
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
      if (panels) g.b_panels = panels + e * cdiv(n, kNr) * k * kNr;
      gemm::run_gemm(g);
    }
    r0 = r1;
  }
}

void m_grouped_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                      const std::optional<at::Tensor>& b_panels, const at::Tensor& masked_m, const at::Tensor& d) {
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
  const float* panels = group_panels(b_panels, b, "m_grouped_fp8_gemm_nt_masked: b_panels");
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
    if (panels) g.b_panels = panels + e * cdiv(n, kNr) * k * kNr;
    gemm::run_gemm(g);
  }
}

}  // namespace
}  // namespace gemm

void m_grouped_fp8_gemm_nt_contiguous_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                              const at::Tensor& sb, const at::Tensor& m_indices, const at::Tensor& d) {
  gemm::m_grouped_contiguous(a, sa, b, sb, std::nullopt, m_indices, d);
}

void m_grouped_fp8_gemm_nt_contiguous_prepacked_out_cpu(const at::Tensor& a, const at::Tensor& sa,
                                                        const at::Tensor& b, const at::Tensor& sb,
                                                        const at::Tensor& b_panels, const at::Tensor& m_indices,
                                                        const at::Tensor& d) {
  gemm::m_grouped_contiguous(a, sa, b, sb, b_panels, m_indices, d);
}

void m_grouped_fp8_gemm_nt_masked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                          const at::Tensor& sb, const at::Tensor& masked_m, int64_t /*expected_m*/,
                                          const at::Tensor& d) {
  gemm::m_grouped_masked(a, sa, b, sb, std::nullopt, masked_m, d);
}

void m_grouped_fp8_gemm_nt_masked_prepacked_out_cpu(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                                    const at::Tensor& sb, const at::Tensor& b_panels,
                                                    const at::Tensor& masked_m, int64_t /*expected_m*/,
                                                    const at::Tensor& d) {
  gemm::m_grouped_masked(a, sa, b, sb, b_panels, masked_m, d);
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
