// AVX2 versions of the row kernels (rows.h). The streaming row copy, and the combine's
// per-token sum: 8 columns per step, FP32 lanes,
// rows added in the order given, then one rounding per value with c10's rules (bfloat16:
// round-to-nearest-even and NaN -> 0x7FC0; float16: F16C's round-to-nearest-even and NaN ->
// sign | 0x7E00, as c10's software conversion), so results are bit-identical to the portable
// loop (up to the payload and sign of NaNs, see rows.h). Compiled without global -m flags:
// the pragma covers this file only.
#include <immintrin.h>

#include "rows.h"

#pragma GCC target("avx2,fma,f16c")

namespace dsv3 {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// 8 lanes of 16-bit values (in the low half of each 32-bit lane) packed to 8 x uint16.
inline __m128i narrow16(__m256i v) {
  return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), is_nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow16(r));
}

inline void store8(c10::Half* p, __m256 v) {
  __m128i r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  if (!_mm256_testz_si256(is_nan, is_nan)) {  // rare: c10 writes sign | 0x7E00 for every NaN
    const __m256i sign = _mm256_srli_epi32(_mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(INT32_MIN)), 16);
    const __m256i canon = _mm256_or_si256(sign, _mm256_set1_epi32(0x7E00));
    const __m128i nan16 = narrow16(_mm256_and_si256(is_nan, _mm256_set1_epi32(0xFFFF)));
    r = _mm_blendv_epi8(r, narrow16(canon), nan16);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
}

}  // namespace

template <typename T>
void sum_rows_avx2(const T* const* rows, int64_t n, int64_t h, T* out) {
  int64_t c = 0;
  for (; c + 16 <= h; c += 16) {  // two independent vectors per step hide the add latency
    __m256 a0 = load8(rows[0] + c), a1 = load8(rows[0] + c + 8);
    for (int64_t i = 1; i < n; ++i) {
      a0 = _mm256_add_ps(a0, load8(rows[i] + c));
      a1 = _mm256_add_ps(a1, load8(rows[i] + c + 8));
    }
    store8(out + c, a0);
    store8(out + c + 8, a1);
  }
  for (; c + 8 <= h; c += 8) {
    __m256 a = load8(rows[0] + c);
    for (int64_t i = 1; i < n; ++i) a = _mm256_add_ps(a, load8(rows[i] + c));
    store8(out + c, a);
  }
  for (; c < h; ++c) {  // the tail column by column, exactly as the portable loop
    float acc = static_cast<float>(rows[0][c]);
    for (int64_t i = 1; i < n; ++i) acc += static_cast<float>(rows[i][c]);
    out[c] = static_cast<T>(acc);
  }
}

void copy_row_avx2(uint8_t* dst, const uint8_t* src, int64_t bytes) {
  constexpr int64_t kMinStreamed = 256;  // short rows: a plain copy (the fence would dominate)
  if (bytes < kMinStreamed) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const int64_t head = (32 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & 31)) & 31;
  std::memcpy(dst, src, head);  // up to the first 32-byte aligned destination address
  int64_t i = head;
  for (; i + 128 <= bytes; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  for (; i + 32 <= bytes; i += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  std::memcpy(dst + i, src + i, bytes - i);
}

void copy_rows_done_avx2() { _mm_sfence(); }

template void sum_rows_avx2<float>(const float* const*, int64_t, int64_t, float*);
template void sum_rows_avx2<c10::BFloat16>(const c10::BFloat16* const*, int64_t, int64_t, c10::BFloat16*);
template void sum_rows_avx2<c10::Half>(const c10::Half* const*, int64_t, int64_t, c10::Half*);

}  // namespace dsv3
