// AVX2 versions of the cast building blocks (x86-64 CPUs since 2013, Intel and AMD alike).
// Compiled without global -m flags: the target pragma covers only this file, whose functions are
// reached only when cpuid reports AVX2, FMA and F16C (cpu_features.cpp).
#include <immintrin.h>

#include "cast_kernels.h"

#pragma GCC target("avx2,fma,f16c")

namespace dsv3 {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The vector form of float_to_e4m3 (fp8.h): the same integer rounding, lane by lane. The
// subnormal lanes round with cvtps (round-to-nearest-even under the default MXCSR).
inline __m256i e4m3_bits(__m256 q) {
  const __m256i bits = _mm256_castps_si256(q);
  const __m256i abits = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
  const __m256i is_nan = _mm256_cmpgt_epi32(abits, _mm256_set1_epi32(0x7F800000));
  const __m256i is_sat = _mm256_cmpgt_epi32(abits, _mm256_set1_epi32(0x43DFFFFF));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), abits);

  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(abits, 20), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(abits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFFF)));
  __m256i exp = _mm256_sub_epi32(_mm256_srli_epi32(r, 23), _mm256_set1_epi32(120));
  __m256i mant = _mm256_and_si256(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(7));
  __m256i normal = _mm256_or_si256(_mm256_slli_epi32(exp, 3), mant);
  __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(abits), _mm256_set1_ps(512.0f)));

  __m256i res = _mm256_blendv_epi8(normal, sub, is_sub);
  res = _mm256_blendv_epi8(res, _mm256_set1_epi32(0x7E), is_sat);
  res = _mm256_or_si256(res, sign);
  return _mm256_blendv_epi8(res, _mm256_set1_epi32(kE4M3NaN), is_nan);
}

inline void store8_bytes(uint8_t* out, __m256i v) {
  __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w16, w16));
}

}  // namespace

template <typename T>
float amax_avx2(const T* p, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_setzero_ps(), any_nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_and_ps(load8(p + i), abs_mask);
    any_nan = _mm256_or_ps(any_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float out = _mm256_movemask_ps(any_nan) ? bits_float(0x7FC00000u) : 0.0f;
  for (float v : lanes) out = nan_max(out, v);
  return nan_max(out, amax_portable(p + i, n - i));
}

template <typename T>
void quantize_avx2(const T* p, int64_t n, float sf, uint8_t* out) {
  const __m256 vsf = _mm256_set1_ps(sf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8_bytes(out + i, e4m3_bits(_mm256_div_ps(load8(p + i), vsf)));  // IEEE division
  quantize_portable(p + i, n - i, sf, out + i);
}

#define DSV3_INSTANTIATE(T)                        \
  template float amax_avx2<T>(const T*, int64_t); \
  template void quantize_avx2<T>(const T*, int64_t, float, uint8_t*);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(c10::BFloat16)
DSV3_INSTANTIATE(c10::Half)
#undef DSV3_INSTANTIATE

}  // namespace dsv3
