// The two tensor-core paths of the FP8 GEMM kernel (fp8_gemm_kernel_cuda.cuh): each policy says
// how a stage's 128 x 128-byte operand tiles sit in shared memory, which part of the 128 x 128
// output tile each thread holds, and computes one stage's FP32 partial sums.
//
// Both policies hand out accumulators in the m16n8 "C fragment" order of mma.sync: for tile
// (i, j) and element q = 2h + e, lane (g = lane / 4, t = lane % 4) holds
//   row = row0 + 16 i + g + 8 h,   col = col0 + 8 j + 2 t + e
// where (row0, col0) is the thread's warp origin. wgmma's accumulators follow the same rule per
// warp (16 rows per warp, one n8 block per 4 registers), so the promotion and the epilogue are
// shared.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3 {
namespace gemm_cuda {

// ---------------------------------------------------------------------------------------------
// MmaSync: any sm_80+ GPU. 8 warps in a 2 x 4 grid of 64 x 32 warp tiles.
//
// The fragment loads rely on one fact of mma.sync: the product pairs element j of A's register
// a0 (a2) with element j of B's register b0 (b1) of a lane with the same lane % 4; which
// physical k each pair is given does not matter, as long as A and B agree. Both operands are
// read with the same k permutation: lane (g, t) loads 8 consecutive bytes k = 8t .. 8t + 7 of
// its row (A) or column (B); bytes 0-3 go to a0/a1/b0, bytes 4-7 to a2/a3/b1. On sm_80 the FP16
// path splits each 4-byte register into two FP16 pairs the same way for A and B.

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 890
// Two E4M3 bytes of w (selected by byte_perm selector sel) -> FP16x2 holding value / 256,
// exactly: the 7 magnitude bits shifted into FP16's exponent/mantissa fields give the E4M3
// value times 2^(7 - 15), subnormals included. E4M3's NaN (S.1111.111) becomes an FP16 NaN.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2_div256(uint32_t w, uint32_t sel) {
  const uint32_t t = __byte_perm(w, 0u, sel);  // [byte, 0, byte, 0]
  const uint32_t mag = t & 0x007F007Fu;
  const uint32_t h = ((t & 0x00800080u) << 8) | (mag << 7);
  const uint32_t nan = __vcmpeq2(mag, 0x007F007Fu);  // 0xFFFF in each NaN half
  return h | (nan & 0x7E007E00u);
}
__device__ __forceinline__ void mma_f16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// d += A(16 x 32) * B(32 x 8) on E4M3 registers loaded as described above. The FP16 path's
// partial sums come out in units of 2^-16 (both operands scaled by 1/256): see kPartialUnit.
__device__ __forceinline__ void mma_e4m3_m16n8k32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  constexpr uint32_t kLo = 0x4140u, kHi = 0x4342u;  // bytes (0,1) and (2,3)
  // k bytes 0-3 of each lane: FP16 a0/a1 take bytes 0-1, a2/a3 bytes 2-3, and B the same.
  const uint32_t a_first[4] = {e4m3x2_to_f16x2_div256(a[0], kLo), e4m3x2_to_f16x2_div256(a[1], kLo),
                               e4m3x2_to_f16x2_div256(a[0], kHi), e4m3x2_to_f16x2_div256(a[1], kHi)};
  const uint32_t b_first[2] = {e4m3x2_to_f16x2_div256(b[0], kLo), e4m3x2_to_f16x2_div256(b[0], kHi)};
  mma_f16_m16n8k16(d, a_first, b_first);
  // k bytes 4-7: the same split of a2/a3 and b1.
  const uint32_t a_second[4] = {e4m3x2_to_f16x2_div256(a[2], kLo), e4m3x2_to_f16x2_div256(a[3], kLo),
                                e4m3x2_to_f16x2_div256(a[2], kHi), e4m3x2_to_f16x2_div256(a[3], kHi)};
  const uint32_t b_second[2] = {e4m3x2_to_f16x2_div256(b[1], kLo), e4m3x2_to_f16x2_div256(b[1], kHi)};
  mma_f16_m16n8k16(d, a_second, b_second);
#endif
}

struct MmaSync {
  static constexpr int kTilesM = 4;           // m16 tiles per warp (64 rows)
  static constexpr int kTilesN = 4;           // n8 tiles per warp (32 columns)
  static constexpr int kRowBytes = 128 + 32;  // padding: the 8-byte fragment loads are conflict-free
  static constexpr int kStages = 2;           // 84 KB: fits every sm_80+ GPU (sm_86/89: 99 KB)
  static constexpr bool kAsyncProxy = false;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
  static constexpr float kPartialUnit = 1.0f;
#else
  static constexpr float kPartialUnit = 65536.0f;
#endif

  // Byte offset of (row, k) in a tile of rows of kRowBytes.
  __device__ static __forceinline__ int offset(int row, int k) { return row * kRowBytes + k; }

  __device__ static __forceinline__ void origin(int warp, int& row0, int& col0) {
    row0 = (warp / 4) * 64;
    col0 = (warp % 4) * 32;
  }

  // part += A[row0:row0+64, 0:128] @ B[col0:col0+32, 0:128]^T for this warp.
  __device__ static __forceinline__ void stage(const uint8_t* as, const uint8_t* bs, int row0, int col0, int lane,
                                               float (&part)[kTilesM][kTilesN][4]) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll 1  // unrolled, the compiler hoists all fragment loads and runs out of registers
    for (int kc = 0; kc < 128; kc += 32) {
      uint32_t af[kTilesM][4], bf[kTilesN][2];
#pragma unroll
      for (int i = 0; i < kTilesM; ++i) {
        const uint8_t* row = as + offset(row0 + i * 16 + g, kc + t * 8);
        const uint2 lo = *reinterpret_cast<const uint2*>(row);                  // row g
        const uint2 hi = *reinterpret_cast<const uint2*>(row + 8 * kRowBytes);  // row g + 8
        af[i][0] = lo.x;
        af[i][1] = hi.x;
        af[i][2] = lo.y;
        af[i][3] = hi.y;
      }
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const uint2 v = *reinterpret_cast<const uint2*>(bs + offset(col0 + j * 8 + g, kc + t * 8));
        bf[j][0] = v.x;
        bf[j][1] = v.y;
      }
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) mma_e4m3_m16n8k32(part[i][j], af[i], bf[j]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Wgmma: Hopper (sm_90a) only. Two warpgroups, each 64 rows x all 128 columns, issuing
// wgmma.m64n128k32 on E4M3 tiles read straight from shared memory.
//
// Shared-memory layout: 128-byte rows (one K block), "128B swizzle": the 16-byte chunk c of row
// r is stored at chunk c ^ (r % 8), tiles 1024-byte aligned. The matrix descriptor says so
// (layout type 1), with 8-row groups 1024 bytes apart (stride byte offset); stepping 32 bytes
// along K moves the descriptor's start address by 32 bytes, as the swizzle is a function of the
// address bits.

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV3_HAS_WGMMA 1
#endif

__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* tile) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((addr >> 4) & 0x3FFFu);  // start address, 16-byte units
  desc |= static_cast<uint64_t>(1u) << 16;               // leading byte offset (unused with swizzle)
  desc |= static_cast<uint64_t>(1024u >> 4) << 32;       // stride byte offset: 8 rows x 128 bytes
  desc |= static_cast<uint64_t>(1u) << 62;               // layout: 128-byte swizzle
  return desc;
}

// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d = A B (accumulate false) or d += A B (true).
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                      bool accumulate) {
#if defined(DSV3_HAS_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<uint32_t>(accumulate)));  // scale-d
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)accumulate;
  __trap();  // never launched off Hopper: the host picks this path only on compute capability 9.x
#endif
}

struct Wgmma {
  static constexpr int kTilesM = 1;   // one m16 slice per warp (the warpgroup covers 64 rows)
  static constexpr int kTilesN = 16;  // all 128 columns
  static constexpr int kRowBytes = 128;
  static constexpr int kStages = 4;          // 134 KB of Hopper's 227 KB
  static constexpr bool kAsyncProxy = true;  // tiles are read by the tensor cores' async proxy
  static constexpr float kPartialUnit = 1.0f;

  __device__ static __forceinline__ int offset(int row, int k) {
    return row * kRowBytes + ((((k >> 4) ^ (row & 7)) << 4) | (k & 15));
  }

  __device__ static __forceinline__ void origin(int warp, int& row0, int& col0) {
    row0 = (warp / 4) * 64 + (warp % 4) * 16;  // warpgroup, then the warp's 16 rows in it
    col0 = 0;
  }

  __device__ static __forceinline__ void stage(const uint8_t* as, const uint8_t* bs, int row0, int col0, int lane,
                                               float (&part)[kTilesM][kTilesN][4]) {
    (void)col0;
    (void)lane;
    float(&d)[64] = *reinterpret_cast<float(*)[64]>(&part[0][0][0]);
    const int warpgroup_row0 = row0 & ~63;
    const uint64_t desc_a = wgmma_desc_sw128(as + warpgroup_row0 * kRowBytes);
    const uint64_t desc_b = wgmma_desc_sw128(bs);
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(d[i]);
#if defined(DSV3_HAS_WGMMA)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      const uint64_t step = static_cast<uint64_t>(kc * 32) >> 4;  // 32 bytes of K
      wgmma_m64n128k32_e4m3(d, desc_a + step, desc_b + step, true);
    }
#if defined(DSV3_HAS_WGMMA)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(d[i]);
  }
};

}  // namespace gemm_cuda
}  // namespace dsv3
