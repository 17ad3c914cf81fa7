// Building blocks of the CPU FP8 GEMM (gemm_cpu.cpp drives them): an e4m3 -> fp32 row
// conversion and register-tile micro-kernels, each in a portable and an AVX2 version.
//
// Number format inside the kernels: payload bytes are decoded to fp32 value / 256 (exact: a
// power-of-two shift of an e4m3 value, never subnormal in fp32). The driver folds the two
// factors of 256 back into the promotion scale, so nothing is lost and the F16C decoder (e4m3
// bits moved into fp16 bits, then vcvtph2ps) needs no multiply.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace dsv3 {
namespace gemm {

constexpr int64_t kBlockK = 128;  // K elements per scale tile / promotion interval
constexpr int kLanes = 8;         // lanes of one running-total vector (an AVX2 register)
constexpr int kMaxMr = 4;         // micro-tile: up to 4 rows of A ...
constexpr int kMaxNr = 3;         // ... times up to 3 rows of B (12 accumulators)
constexpr float kDecodeFactor = 256.0f;

// The exact value of an e4m3fn byte divided by 256 (NaN for 0x7F and 0xFF).
inline float e4m3_to_float_div256(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const float f = e == 0 ? std::ldexp(static_cast<float>(m), -9 - 8) : std::ldexp(static_cast<float>(8 + m), e - 10 - 8);
  return (v & 0x80) ? -f : f;
}

// Writes dst[i] = e4m3(src[i]) / 256 for i < n.
using ConvertFn = void (*)(const uint8_t* src, int64_t n, float* dst);

// One micro-tile over one K block: for i < MR, j < NR the FP32 dot product of a row i (a + i*lda)
// and b row j (b + j*ldb) over len8 elements (a multiple of 8, zero padded) is formed in 8 lanes
// and promoted: tot[i*tot_rs + j*8 + l] += scale[i*kMaxNr + j] * lanes[l]. The driver sums the 8
// lanes of the running total once at the end.
using TileFn = void (*)(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t len8, const float* scale,
                        float* tot, int64_t tot_rs);

struct KernelSet {
  ConvertFn convert;
  TileFn tile[kMaxMr][kMaxNr];  // tile[mr - 1][nr - 1]
};

KernelSet portable_kernels();
KernelSet avx2_kernels();  // gemm_avx2.cpp; call only when the CPU has AVX2, FMA and F16C

}  // namespace gemm
}  // namespace dsv3
