// The Hopper FP8 GEMM kernel (sm_90a): the same arithmetic and the same problems as the generic
// kernel (fp8_gemm_kernel_cuda.cuh: dense, m-grouped contiguous and masked, k-grouped), with
// Hopper's data movement and warp specialisation:
// - one 128 x 128 output tile per block of three warpgroups: warpgroup 0 produces (one warp:
//   lane 0 issues the tensor-memory-accelerator (TMA) loads of the A and B tiles, all 32 lanes
//   copy the stage's scales), warpgroups 1 and 2 consume (64 rows each, wgmma.m64n128k32 on the
//   E4M3 tiles straight from shared memory, then the FP32 promotion in registers);
// - kTmaStages stages of shared memory, each guarded by two mbarriers: `full` completes when the
//   producer's 32 lanes have arrived and the TMA has delivered the stage's bytes, `empty` when
//   all 256 consumer threads have finished reading the stage;
// - the TMA writes each tile in the 128-byte swizzle the wgmma descriptors describe
//   (Wgmma::offset), and fills everything outside the tensor with zeros, so ragged M, N and K
//   need no masking in the loads; only 16-byte-aligned operands qualify (the host checks).
// No setmaxnreg: the consumers fit in the 168 registers per thread a 384-thread block gets (no
// spills), so moving registers to them would buy nothing.
//
// Every wait has a watchdog: a stage that has not arrived after kWatchdogNs traps (an error the
// host sees) instead of hanging the GPU. The kernel has not run on a GPU yet; it is selected
// only with DSV3_FP8_GEMM_KERNEL=tma.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "fp8_gemm_kernel_cuda.cuh"

namespace dsv3 {
namespace gemm_cuda {

constexpr int kTmaStages = 5;
constexpr int kTmaThreads = 384;                         // producer warpgroup + two consumer warpgroups
constexpr int kConsumerThreads = 256;
constexpr int kTileBytes = kBlockM * kBlockK;            // one 128 rows x 128 bytes E4M3 tile
constexpr uint32_t kStageTxBytes = 2 * kTileBytes;       // A and B boxes, counted whole even at edges
constexpr unsigned long long kWatchdogNs = 10000000000ull;  // 10 s

static_assert(kBlockM == kBlockN, "A and B boxes share one shape");

constexpr int tma_smem_bytes() {
  return kSmemAlign + kTmaStages * (2 * kTileBytes + (kBlockM + kBlockN) * 4 + 2 * 8) + kBlockM * 4;
}

// ---------------------------------------------------------------------------------------------
// mbarrier and TMA primitives (PTX 8.0, sm_90)

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Adds `bytes` to the transactions the barrier's current phase waits for (no arrival).
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
// Waits for the phase of parity `parity` to complete; traps after kWatchdogNs (the launch then
// fails with an illegal-instruction error). Inline and free of calls (no printf): a call between
// wgmma instructions makes ptxas serialise them.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const unsigned long long start = global_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_ns() - start > kWatchdogNs) __trap();
  }
}

// Box (c0 = K bytes, c1 = row, c2 = batch) of `map` into shared memory at dst; completes on bar.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
#if defined(DSV3_HAS_WGMMA)
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#else
  (void)dst, (void)map, (void)bar, (void)c0, (void)c1, (void)c2;
#endif
}

// ---------------------------------------------------------------------------------------------
// The kernel's shared memory and the two roles

struct TmaSmem {
  uint8_t* tiles;  // [kTmaStages][A tile | B tile], 1024-byte aligned
  float* sa;       // [kTmaStages][kBlockM]
  float* sb;       // [kTmaStages][kBlockN]
  uint64_t* full;  // [kTmaStages]
  uint64_t* empty;  // [kTmaStages]
  int* idx;         // [kBlockM] group of each tile row (tile_row_groups)
};

// What both roles agree on: the tile, its batch entry and how many K blocks and groups it has.
struct TmaTile {
  int64_t m0, n0, num_kb;
  int z, num_groups;
};

// The producer warp: for every (group pass, K block), in the order the consumers take them,
// waits until the stage is free, has lane 0 issue the two TMA loads and all lanes copy the
// stage's scales, then arrives on the stage's `full` barrier.
__device__ __forceinline__ void produce(const CUtensorMap* map_a, const CUtensorMap* map_b, const Params& p,
                                        const TmaSmem& sm, const TmaTile& tile, int lane) {
  constexpr int S = kTmaStages;
  if (lane == 0) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map_b)) : "memory");
  }
  const int a_z = p.masked_m != nullptr ? tile.z : 0;  // masked: A is [batch][Mmax][K]
  const float* sa = p.sa + tile.z * p.sa_bs;
  int64_t it = 0;  // stage uses over all group passes
  for (int group = next_group(sm.idx, -1, tile.num_groups); group < tile.num_groups;
       group = next_group(sm.idx, group, tile.num_groups)) {
    const int bz = p.m_indices != nullptr ? group : tile.z;
    const float* sb = p.sb + bz * p.sb_bs;
    for (int64_t kb = 0; kb < tile.num_kb; ++kb, ++it) {
      const int s = static_cast<int>(it % S);
      const int64_t round = it / S;
      if (round > 0) mbar_wait(&sm.empty[s], static_cast<uint32_t>((round - 1) & 1));
      if (lane == 0) {
        uint8_t* stage = sm.tiles + s * 2 * kTileBytes;
        mbar_expect_tx(&sm.full[s], kStageTxBytes);
        const int k0 = static_cast<int>(kb * kBlockK);
        tma_load_3d(stage, map_a, &sm.full[s], k0, static_cast<int>(tile.m0), a_z);
        tma_load_3d(stage + kTileBytes, map_b, &sm.full[s], k0, static_cast<int>(tile.n0), bz);
      }
      // Scales of the stage; zero outside the problem and for rows of other groups.
      for (int i = lane; i < kBlockM + kBlockN; i += 32) {
        float v = 0.0f;
        if (i < kBlockM) {
          if (sm.idx[i] == group) v = sa[(tile.m0 + i) * p.sa_rs + kb * p.sa_ks];
          sm.sa[s * kBlockM + i] = v;
        } else {
          const int64_t col = tile.n0 + (i - kBlockM);
          if (col < p.n) v = sb[(col / p.sb_rows) * p.sb_rs + kb * p.sb_ks];
          sm.sb[s * kBlockN + (i - kBlockM)] = v;
        }
      }
      mbar_arrive(&sm.full[s]);  // releases this lane's scale stores
    }
  }
}

// Consumer thread ct (0..255): warpgroup ct / 128 owns tile rows 64 (ct / 128) .. + 63, all 128
// columns. Per stage: four wgmma into the partial sums, the FP32 promotion into the accumulator,
// an arrival on the stage's `empty` barrier; per group pass, the epilogue of that group's rows.
template <typename OutT>
__device__ __forceinline__ void consume(const Params& p, const TmaSmem& sm, const TmaTile& tile, int ct) {
  constexpr int S = kTmaStages;
  const int wg = ct / 128, warp = (ct / 32) % 4, lane = ct % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = wg * 64 + warp * 16;  // this warp's 16 rows (see fp8_gemm_mma_cuda.cuh)
  const float* c = p.c == nullptr ? nullptr : p.c + tile.z * p.c_bs;
  OutT* d = static_cast<OutT*>(p.d) + tile.z * p.d_bs;

  float part[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) part[i] = 0.0f;
  int64_t it = 0;
  for (int group = next_group(sm.idx, -1, tile.num_groups); group < tile.num_groups;
       group = next_group(sm.idx, group, tile.num_groups)) {
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

    for (int64_t kb = 0; kb < tile.num_kb; ++kb, ++it) {
      const int s = static_cast<int>(it % S);
      mbar_wait(&sm.full[s], static_cast<uint32_t>((it / S) & 1));
      const uint8_t* stage = sm.tiles + s * 2 * kTileBytes;
      const uint64_t desc_a = wgmma_desc_sw128(stage + wg * 64 * kBlockK);
      const uint64_t desc_b = wgmma_desc_sw128(stage + kTileBytes);
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_operand(part[i]);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int kc = 0; kc < 4; ++kc) {  // 32 bytes of K each; the first overwrites the partial sums
        const uint64_t step = static_cast<uint64_t>(kc * 32) >> 4;
        wgmma_m64n128k32_e4m3(part, desc_a + step, desc_b + step, kc > 0);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");

      // A's scales, read while the tensor cores work.
      const float fa0 = sm.sa[s * kBlockM + row0 + g], fa1 = sm.sa[s * kBlockM + row0 + g + 8];
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_operand(part[i]);

      // Promotion: acc += partial * sa * sb (register q = 4 j + 2 h + e: row g + 8h, column
      // 8j + 2t + e). B's scales come straight from shared memory: held in registers, they
      // pushed the consumers past the 168 registers ptxas gives them (spills).
      const float* fb = sm.sb + s * kBlockN + t * 2;
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float f = fb[j * 8 + e];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int q = j * 4 + h * 2 + e;
            acc[q] = fmaf(part[q], (h == 0 ? fa0 : fa1) * f, acc[q]);
          }
        }
      mbar_arrive(&sm.empty[s]);  // this thread is done with the stage
    }

    // Epilogue: this group's rows of the tile.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rl = row0 + g + h * 8;
      if (sm.idx[rl] != group) continue;
      const int64_t r = tile.m0 + rl;
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = tile.n0 + j * 8 + t * 2 + e;
          if (col >= p.n) continue;
          float v = acc[j * 4 + h * 2 + e];
          if (c != nullptr) v += c[r * p.ldc + col];
          store_out<OutT>(d, r * p.ldd + col, v);
        }
    }
  }
  if (p.m_indices != nullptr) store_ungrouped_rows<OutT>(p, d, sm.idx, tile.m0, tile.n0, ct, kConsumerThreads);
}

// ---------------------------------------------------------------------------------------------
// The kernel: grid (n tiles, m tiles, batch). map_a: [batch or 1][rows][K] of A; map_b:
// [batch or groups][N][K] of B (Params keeps the scales, C, D and the row bookkeeping).

template <typename OutT>
__global__ void __launch_bounds__(kTmaThreads, 1)
    fp8_gemm_tma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                        const Params p) {
#if defined(DSV3_HAS_WGMMA)
  constexpr int S = kTmaStages;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  TmaSmem sm;
  sm.tiles = smem_raw + ((kSmemAlign - (raw_addr % kSmemAlign)) % kSmemAlign);
  sm.sa = reinterpret_cast<float*>(sm.tiles + S * 2 * kTileBytes);
  sm.sb = sm.sa + S * kBlockM;
  sm.full = reinterpret_cast<uint64_t*>(sm.sb + S * kBlockN);
  sm.empty = sm.full + S;
  sm.idx = reinterpret_cast<int*>(sm.empty + S);

  TmaTile tile;
  tile.n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  tile.m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  tile.z = blockIdx.z;
  tile.num_kb = (p.k + kBlockK - 1) / kBlockK;
  tile.num_groups = p.m_indices != nullptr ? p.num_groups : 1;
  const int64_t m_valid = valid_rows(p, tile.z);
  if (tile.m0 >= m_valid) return;  // the whole block leaves before any barrier exists
  tile_row_groups(p, tile.m0, m_valid, sm.idx, threadIdx.x, kTmaThreads);
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&sm.full[s], 32);                 // the producer warp's lanes (+ the TMA bytes)
      mbar_init(&sm.empty[s], kConsumerThreads);  // every consumer thread
    }
    // The initialised barriers, visible to the TMA unit (the async proxy).
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < 32) {
    produce(&map_a, &map_b, p, sm, tile, threadIdx.x);
  } else if (threadIdx.x >= 128) {
    consume<OutT>(p, sm, tile, threadIdx.x - 128);
  }  // warps 1-3 idle out
#else
  (void)map_a, (void)map_b, (void)p;
  __trap();  // never launched off Hopper: the host picks this kernel only on compute capability 9.x
#endif
}

}  // namespace gemm_cuda
}  // namespace dsv3
