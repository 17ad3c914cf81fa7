// The FP8 GEMM kernel on CUDA (sm_80 and newer): D = C + A @ B^T with DeepSeek-V3's
// fine-grained scaling, for the dense, m-grouped (contiguous and masked) and k-grouped ops.
//
// Arithmetic, as DeepGEMM and the CPU kernel: for every 128-wide block kb of the reduction,
// the tensor cores compute the block's partial sums in FP32 from the raw E4M3 payloads; the
// partial sums are then promoted, acc += partial * sa[m, kb] * sb[n, kb], into an FP32
// accumulator. A ragged last block (K % 128 != 0) is zero-filled, so any K works.
//
// Written to be simple and certainly correct rather than fast:
// - one 128 x 128 output tile per thread block of 8 warps, 128 K per pipeline stage (one scale
//   block), a cp.async pipeline of Mma::kStages stages in shared memory;
// - operands move global -> shared with cp.async (16 bytes, zero-filled past every edge) when
//   rows are 16-byte aligned, byte by byte otherwise (odd K);
// - the tensor-core work of a stage is a policy (fp8_gemm_mma_cuda.cuh): MmaSync (mma.sync, any
//   sm_80+ GPU; E4M3 operands directly on sm_89+, converted exactly to FP16 on sm_80) or Wgmma
//   (Hopper's wgmma, sm_90a only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8_gemm_mma_cuda.cuh"

namespace dsv3 {
namespace gemm_cuda {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 128;  // the scale block: one promotion per stage
constexpr int kThreads = 256;
constexpr int kNoRow = -2;  // idx value of a row outside the problem (never written)
constexpr int kSmemAlign = 1024;  // the swizzled wgmma tiles need 1024-byte alignment

template <typename Mma>
constexpr int stage_bytes() {
  return (kBlockM + kBlockN) * Mma::kRowBytes;
}
template <typename Mma>
constexpr int smem_bytes() {
  return kSmemAlign + Mma::kStages * (stage_bytes<Mma>() + (kBlockM + kBlockN) * 4) + kBlockM * 4;
}

// Everything a launch needs; strides are in elements, *_bs are batch (grid.z) strides.
struct Params {
  const uint8_t* a;  // [batch][m][k] e4m3 rows with stride lda
  int64_t lda, a_bs;
  const float* sa;  // sa[row * sa_rs + kb * sa_ks]
  int64_t sa_rs, sa_ks, sa_bs;
  const uint8_t* b;  // [batch or groups][n][k] e4m3 rows with stride ldb
  int64_t ldb, b_bs;
  const float* sb;  // sb[(col / sb_rows) * sb_rs + kb * sb_ks]; sb_rows 128 (blocks) or 1 (rows)
  int64_t sb_rs, sb_ks, sb_bs;
  int sb_rows;
  const float* c;  // optional f32 [batch][m][n] added to the product
  int64_t ldc, c_bs;
  void* d;  // f32 or bf16 [batch][m][n]
  int64_t ldd, d_bs;
  int64_t m, n, k;
  const int* masked_m;   // [batch] valid rows per batch entry, or null (all m rows)
  const int* m_indices;  // [m] group of each row (-1: padding, written as zeros), or null
  int num_groups;        // groups that m_indices may name (B is [num_groups][n][k])
  bool vec16;            // every A/B row start 16-byte aligned and k % 16 == 0
};

// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies `bytes` (0..16) from global memory and zero-fills the rest of the 16-byte chunk.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's newest cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Shared-memory layout of one block (dynamic, smem_bytes<Mma>()).
struct Smem {
  uint8_t* ab;  // [stage][A rows kBlockM, then B rows kBlockN], each row laid out by the Mma policy
  float* sa;    // [stage][kBlockM]
  float* sb;    // [stage][kBlockN]
  int* idx;     // [kBlockM] group of each row of the tile, or kNoRow / -1 / invalid
};

// Loads block kb of A (rows whose idx == group), B (columns < n) and their scales into `stage`.
// Everything outside the problem becomes zero, so it adds nothing to the partial sums.
template <typename Mma>
__device__ __forceinline__ void load_stage(const Params& p, const Smem& s, int stage, int64_t kb,
                                           const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                                           int64_t m0, int64_t n0, int group) {
  uint8_t* as = s.ab + stage * stage_bytes<Mma>();  // A rows, then B rows
  const int64_t k0 = kb * kBlockK;
  const int64_t k_left = p.k - k0;  // > 0
  if (p.vec16) {
    constexpr int kChunksPerRow = kBlockK / 16;
#pragma unroll 1
    for (int c = threadIdx.x; c < (kBlockM + kBlockN) * kChunksPerRow; c += kThreads) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 16;
      const bool is_a = row < kBlockM;
      const int r = is_a ? row : row - kBlockM;
      const bool row_ok = is_a ? s.idx[r] == group : n0 + r < p.n;
      const int64_t rem = k_left - col;
      const int bytes = (row_ok && rem > 0) ? static_cast<int>(rem < 16 ? rem : 16) : 0;
      const uint8_t* src = is_a ? a : b;  // a valid address even when nothing is read
      if (bytes > 0) src += is_a ? (m0 + r) * p.lda + k0 + col : (n0 + r) * p.ldb + k0 + col;
      cp_async_16(as + Mma::offset(row, col), src, bytes);
    }
  } else {
#pragma unroll 1
    for (int i = threadIdx.x; i < (kBlockM + kBlockN) * kBlockK; i += kThreads) {
      const int row = i / kBlockK, col = i % kBlockK;
      const bool is_a = row < kBlockM;
      const int r = is_a ? row : row - kBlockM;
      const bool ok = (is_a ? s.idx[r] == group : n0 + r < p.n) && col < k_left;
      uint8_t v = 0;
      if (ok) v = is_a ? a[(m0 + r) * p.lda + k0 + col] : b[(n0 + r) * p.ldb + k0 + col];
      as[Mma::offset(row, col)] = v;
    }
  }
#pragma unroll 1
  for (int i = threadIdx.x; i < kBlockM + kBlockN; i += kThreads) {
    float v = 0.0f;
    if (i < kBlockM) {
      if (s.idx[i] == group) v = sa[(m0 + i) * p.sa_rs + kb * p.sa_ks];
      s.sa[stage * kBlockM + i] = v;
    } else {
      const int64_t col = n0 + (i - kBlockM);
      if (col < p.n) v = sb[(col / p.sb_rows) * p.sb_rs + kb * p.sb_ks];
      s.sb[stage * kBlockN + (i - kBlockM)] = v;
    }
  }
}

template <typename OutT>
__device__ __forceinline__ void store_out(OutT* d, int64_t i, float v);
template <>
__device__ __forceinline__ void store_out<float>(float* d, int64_t i, float v) {
  d[i] = v;
}
template <>
__device__ __forceinline__ void store_out<__nv_bfloat16>(__nv_bfloat16* d, int64_t i, float v) {
  d[i] = __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// Row bookkeeping shared with the TMA kernel (fp8_gemm_tma_cuda.cuh)

// Rows of batch entry z that are computed: masked_m[z] clamped to [0, m], or all m rows.
__device__ __forceinline__ int64_t valid_rows(const Params& p, int z) {
  if (p.masked_m == nullptr) return p.m;
  const int mm = p.masked_m[z];
  return mm < 0 ? 0 : (mm < p.m ? mm : p.m);
}

// idx[i] = group of tile row m0 + i: 0 for dense and masked rows; m_indices for the contiguous
// layout, where values below -1 are marked invalid (num_groups); kNoRow past the valid rows.
// Thread `tid` of `threads` fills its share.
__device__ __forceinline__ void tile_row_groups(const Params& p, int64_t m0, int64_t m_valid, int* idx, int tid,
                                                int threads) {
  for (int i = tid; i < kBlockM; i += threads) {
    const int64_t r = m0 + i;
    int v = kNoRow;
    if (r < m_valid) {
      v = 0;
      if (p.m_indices != nullptr) {
        v = p.m_indices[r];
        if (v < -1) v = p.num_groups;
      }
    }
    idx[i] = v;
  }
}

// The next group after `after` among the tile's rows (num_groups when none is left); every
// thread computes the same sequence, so the tile is computed once per distinct group.
__device__ __forceinline__ int next_group(const int* idx, int after, int num_groups) {
  int next = num_groups;
  for (int i = 0; i < kBlockM; ++i) {
    const int v = idx[i];
    if (v > after && v < next) next = v;
  }
  return next;
}

// Rows of no group (contiguous layout): -1 is padding, written as zeros; an invalid index is
// written as NaN so that the mistake shows.
template <typename OutT>
__device__ __forceinline__ void store_ungrouped_rows(const Params& p, OutT* d, const int* idx, int64_t m0, int64_t n0,
                                                     int tid, int threads) {
  for (int i = tid; i < kBlockM * kBlockN; i += threads) {
    const int rl = i / kBlockN;
    const int64_t col = n0 + i % kBlockN;
    const int v = idx[rl];
    if (v == kNoRow || (v >= 0 && v < p.num_groups) || col >= p.n) continue;
    store_out<OutT>(d, (m0 + rl) * p.ldd + col, v == -1 ? 0.0f : __int_as_float(0x7FC00000));
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: grid (n tiles, m tiles, batch).

template <typename Mma, typename OutT>
__global__ void __launch_bounds__(kThreads, 1) fp8_gemm_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  uint8_t* smem = smem_raw + ((kSmemAlign - (raw_addr % kSmemAlign)) % kSmemAlign);
  Smem s;
  s.ab = smem;
  s.sa = reinterpret_cast<float*>(smem + Mma::kStages * stage_bytes<Mma>());
  s.sb = s.sa + Mma::kStages * kBlockM;
  s.idx = reinterpret_cast<int*>(s.sb + Mma::kStages * kBlockN);

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int z = blockIdx.z;
  const int64_t m_valid = valid_rows(p, z);
  if (m0 >= m_valid) return;  // nothing of this tile is ours to write (masked rows stay untouched)

  const uint8_t* a = p.a + z * p.a_bs;
  const float* sa = p.sa + z * p.sa_bs;
  const float* c = p.c == nullptr ? nullptr : p.c + z * p.c_bs;
  OutT* d = static_cast<OutT*>(p.d) + z * p.d_bs;

  tile_row_groups(p, m0, m_valid, s.idx, threadIdx.x, kThreads);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int wm, wn;  // the warp's origin in the tile (see fp8_gemm_mma_cuda.cuh)
  Mma::origin(warp, wm, wn);
  const int g = lane / 4, t = lane % 4;
  const int64_t num_kb = (p.k + kBlockK - 1) / kBlockK;
  const int num_groups = p.m_indices != nullptr ? p.num_groups : 1;

  // One pass per distinct group among the tile's rows, in increasing order (one pass unless a
  // group boundary falls inside the tile). Every thread finds the same next group.
  for (int group = next_group(s.idx, -1, num_groups); group < num_groups;
       group = next_group(s.idx, group, num_groups)) {
    const int bz = p.m_indices != nullptr ? group : z;
    const uint8_t* b = p.b + bz * p.b_bs;
    const float* sb = p.sb + bz * p.sb_bs;

    float acc[Mma::kTilesM][Mma::kTilesN][4];
#pragma unroll
    for (int i = 0; i < Mma::kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < Mma::kTilesN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Pipeline of S = Mma::kStages stages: cp.async group i loads block i into stage i % S.
    // Prologue: groups 0 .. S-2. Iteration kb commits group kb + S - 1 (possibly empty, so the
    // count stays regular) into the stage read in iteration kb - 1, then waits until at most S-1
    // groups are pending, i.e. groups 0 .. kb (block kb) have landed.
    constexpr int S = Mma::kStages;
#pragma unroll 1
    for (int st = 0; st < S - 1; ++st) {
      if (st < num_kb) load_stage<Mma>(p, s, st, st, a, sa, b, sb, m0, n0, group);
      cp_async_commit();
    }
    for (int64_t kb = 0; kb < num_kb; ++kb) {
      const int stage = static_cast<int>(kb % S);
      const int64_t ahead = kb + S - 1;
      if (ahead < num_kb) load_stage<Mma>(p, s, static_cast<int>(ahead % S), ahead, a, sa, b, sb, m0, n0, group);
      cp_async_commit();
      cp_async_wait<S - 1>();
#if defined(DSV3_HAS_WGMMA)
      if constexpr (Mma::kAsyncProxy) {  // what this thread wrote is read by the async proxy next
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      }
#endif
      __syncthreads();

      const uint8_t* as = s.ab + stage * stage_bytes<Mma>();
      const uint8_t* bs = as + kBlockM * Mma::kRowBytes;
      float part[Mma::kTilesM][Mma::kTilesN][4];
#pragma unroll
      for (int i = 0; i < Mma::kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < Mma::kTilesN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[i][j][e] = 0.0f;
      Mma::stage(as, bs, wm, wn, lane, part);

      // Promotion: acc += partial * sa * sb (the FP32 accumulation of DeepSeek-V3).
      const float* sas = s.sa + stage * kBlockM;
      const float* sbs = s.sb + stage * kBlockN;
#pragma unroll
      for (int i = 0; i < Mma::kTilesM; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float fa = sas[wm + i * 16 + g + h * 8];
#pragma unroll
          for (int j = 0; j < Mma::kTilesN; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float f = fa * sbs[wn + j * 8 + t * 2 + e];
              acc[i][j][h * 2 + e] = fmaf(part[i][j][h * 2 + e] * Mma::kPartialUnit, f, acc[i][j][h * 2 + e]);
            }
        }
      __syncthreads();  // the next iteration's load overwrites this stage
    }

    // Epilogue: this group's rows of the tile (c0, c1: row g; c2, c3: row g + 8).
#pragma unroll
    for (int i = 0; i < Mma::kTilesM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rl = wm + i * 16 + g + h * 8;
        if (s.idx[rl] != group) continue;
        const int64_t r = m0 + rl;
#pragma unroll
        for (int j = 0; j < Mma::kTilesN; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t col = n0 + wn + j * 8 + t * 2 + e;
            if (col >= p.n) continue;
            float v = acc[i][j][h * 2 + e];
            if (c != nullptr) v += c[r * p.ldc + col];
            store_out<OutT>(d, r * p.ldd + col, v);
          }
      }
  }

  if (p.m_indices != nullptr) store_ungrouped_rows<OutT>(p, d, s.idx, m0, n0, threadIdx.x, kThreads);
}

}  // namespace gemm_cuda
}  // namespace dsv3
