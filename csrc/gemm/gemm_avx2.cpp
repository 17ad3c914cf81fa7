// AVX2 + FMA + F16C versions of the FP8 GEMM building blocks (gemm_kernels.h). The target
// pragma covers only this file; gemm_cpu.cpp calls these only when cpuid allows.
#include <immintrin.h>

#include "gemm_kernels.h"

#pragma GCC target("avx2,fma,f16c")

namespace dsv3 {
namespace gemm {
namespace {

// 16 e4m3 bytes -> 16 fp16 whose values are the e4m3 values / 256: the 4 exponent and 3
// mantissa bits move into the fp16 fields (fp16's larger bias divides by 2^8, subnormals
// included); the NaN code S.1111.111 gets fp16 exponent 31 with a non-zero mantissa (NaN).
inline __m256i e4m3x16_to_f16(__m128i bytes) {
  const __m256i x = _mm256_cvtepu8_epi16(bytes);
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi16(0x7F));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8);
  const __m256i nan = _mm256_and_si256(_mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7E00));
  return _mm256_or_si256(_mm256_or_si256(sign, _mm256_slli_epi16(mag, 7)), nan);
}

void convert_avx2(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = e4m3x16_to_f16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
    _mm256_storeu_ps(dst + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
  }
  for (; i < n; ++i) dst[i] = e4m3_to_float_div256(src[i]);
}

template <int MR, int NR>
void tile_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t len8, const float* scale, float* tot,
               int64_t tot_rs) {
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < len8; k += 8) {
    __m256 bv[NR];
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_loadu_ps(b + j * ldb + k);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a + i * lda + k);
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) {
      float* t = tot + i * tot_rs + j * kLanes;
      _mm256_storeu_ps(t, _mm256_fmadd_ps(acc[i][j], _mm256_set1_ps(scale[i * kMaxNr + j]), _mm256_loadu_ps(t)));
    }
}

}  // namespace

KernelSet avx2_kernels() {
  return {&convert_avx2,
          {{&tile_avx2<1, 1>, &tile_avx2<1, 2>, &tile_avx2<1, 3>},
           {&tile_avx2<2, 1>, &tile_avx2<2, 2>, &tile_avx2<2, 3>},
           {&tile_avx2<3, 1>, &tile_avx2<3, 2>, &tile_avx2<3, 3>},
           {&tile_avx2<4, 1>, &tile_avx2<4, 2>, &tile_avx2<4, 3>}}};
}

}  // namespace gemm
}  // namespace dsv3
