// AVX2 + FMA + F16C versions of the FP8 GEMM building blocks (gemm_kernels.h). The target
// pragma covers only this file; gemm_cpu.cpp calls these only when active_cpu_isa() allows.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

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

// 8 e4m3 bytes -> 8 fp32 (value / 256), exact, NaN kept (the same bit moves as above).
inline __m256 e4m3x8_to_f32(const uint8_t* p) {
  const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(x, _mm_set1_epi16(0x7F));
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x80)), 8);
  const __m128i nan = _mm_and_si128(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7E00));
  return _mm256_cvtph_ps(_mm_or_si128(_mm_or_si128(sign, _mm_slli_epi16(mag, 7)), nan));
}

// In-register transpose of 8 x 8 floats.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Decodes 8 x 8 blocks (8 rows, 8 K columns) and transposes them in registers into the panel.
void pack_b_avx2(const uint8_t* src, int64_t ld, int rows, int64_t k0, int64_t len, float* dst) {
  const int64_t full = len & ~int64_t{7};
  for (int64_t kk = 0; kk < full; kk += 8)
    for (int h = 0; h < kNr; h += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = h + i < rows ? e4m3x8_to_f32(src + (h + i) * ld + k0 + kk) : _mm256_setzero_ps();
      transpose8(r);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(dst + (kk + t) * kNr + h, r[t]);
    }
  for (int64_t kk = full; kk < len; ++kk)
    for (int r = 0; r < kNr; ++r) dst[kk * kNr + r] = r < rows ? e4m3_to_float_div256(src[r * ld + k0 + kk]) : 0.0f;
}

// The packed 6 x 16 micro-kernel: per K step, two B vectors times six broadcast A values into
// 12 accumulators (12 FMAs for 8 loads); at each block end the partials are promoted into C.
void micro_avx2(const float* ap, int64_t lda, const float* bp, int64_t k0, int64_t k1, const float* asc,
                const float* bsc, float* c, int64_t ldc) {
  static_assert(kMr == 6 && kNr == 16, "micro_avx2 is written for 6 x 16 tiles");
  for (int64_t b0 = k0; b0 < k1; b0 += kBlockK) {
    const int64_t len = std::min(kBlockK, k1 - b0);
    __m256 acc[kMr][2];
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int64_t k = 0; k < len; ++k, ++ap, bp += kNr) {
      const __m256 bv0 = _mm256_loadu_ps(bp), bv1 = _mm256_loadu_ps(bp + 8);
#pragma GCC unroll 6
      for (int i = 0; i < kMr; ++i) {
        const __m256 av = _mm256_broadcast_ss(ap + i * lda);
        acc[i][0] = _mm256_fmadd_ps(av, bv0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(av, bv1, acc[i][1]);
      }
    }
    const int64_t kb = b0 / kBlockK;
    const __m256 bs0 = _mm256_loadu_ps(bsc + kb * kNr), bs1 = _mm256_loadu_ps(bsc + kb * kNr + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) {
      const __m256 s = _mm256_broadcast_ss(asc + kb * kMr + i);
      float* ci = c + i * ldc;
      _mm256_storeu_ps(ci, _mm256_fmadd_ps(acc[i][0], _mm256_mul_ps(s, bs0), _mm256_loadu_ps(ci)));
      _mm256_storeu_ps(ci + 8, _mm256_fmadd_ps(acc[i][1], _mm256_mul_ps(s, bs1), _mm256_loadu_ps(ci + 8)));
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- GEMV ----
// The GEMV decodes each B byte once per kGemvMr rows of A, so its decoder must be cheap (F16C's
// vcvtph2ps issues at about one per cycle on Zen 3 and bounded the old fp16 route). Here 32 e4m3
// bytes become 4 x 8 fp32 with shifts and ands only: in lane J (J = 0..3), 32-bit element i
// holds byte 4i + J, moved to bits 27..20 with its sign copied above and masked to
// sign | 4 exponent bits | 3 mantissa bits in fp32's fields. That fp32 is the e4m3 value * 2^-120,
// exactly, for normals and subnormals alike (e4m3 subnormals become fp32 subnormals: the kernel
// clears MXCSR.DAZ while it runs). NaN codes decode to a finite value; a running byte maximum
// flags them (see gemv_tile).
//
// Cost per 32 bytes: 5 shifts + 4 ands (Lanes below) where moving each byte to the top of its
// 32-bit element first took 7 shifts + 4 ands; at M = 1 the decoder, not the 4 FMAs, is most of
// the work, and vector shifts issue on only two of Zen 3's four FP pipes.
constexpr int kGemvStep = 32;          // B bytes per row per step (one AVX2 load)
constexpr float kGemvAScale = 0x1p64f;  // A is packed as value * 2^64 (products stay normal)
constexpr float kGemvUnscale = 0x1p56f;  // 2^120 / 2^64: restores a block partial before promotion
// Software prefetch distance (bytes ahead in each B row, one prefetch per 64-byte line). The
// hardware prefetcher stops at 4 KiB page boundaries; a plain AVX2 read loop over a 51 MB
// buffer in 4 KiB pages streamed 13 GB/s without and 17 GB/s with a 1 KiB prefetch here (one
// thread), which matters once two threads make the GEMV memory-bound.
constexpr int64_t kGemvPrefetch = 1024;

// The two 16-bit arithmetic shifts that put e4m3 bytes at bits 11..4 of their 16-bit word (sign
// copied above): `odd` holds bytes 1 and 3 of every 32-bit element, `even` bytes 0 and 2 (moved
// up by 8 first). A lane is then its word, moved to the upper half for bytes 0 and 1, masked.
inline __m256i odd_bytes(__m256i x) { return _mm256_srai_epi16(x, 4); }
inline __m256i even_bytes(__m256i x) { return _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 4); }

// Lane J from odd_bytes (J = 1, 3) or even_bytes (J = 0, 2) of the same 32 bytes.
template <int J>
inline __m256 e4m3_lane(__m256i w) {
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0x87F00000u));
  return _mm256_castsi256_ps(_mm256_and_si256(J >= 2 ? w : _mm256_slli_epi32(w, 16), mask));
}

// A row in the GEMV layout: value * 2^64; in every 32-column chunk, column 4i + J is stored at
// offset 8J + i (the order e4m3_lane produces for B); zero padded to a multiple of 32.
void gemv_pack_a_avx2(const uint8_t* src, int64_t k, float* dst) {
  alignas(32) float tmp[kGemvStep];
  for (int64_t c = 0; c < k; c += kGemvStep) {
    const int64_t n = std::min<int64_t>(kGemvStep, k - c);
    convert_avx2(src + c, n, tmp);  // value / 256
    for (int64_t t = n; t < kGemvStep; ++t) tmp[t] = 0.0f;
    for (int t = 0; t < kGemvStep; ++t) dst[c + (t & 3) * 8 + (t >> 2)] = tmp[t] * (kGemvAScale * kDecodeFactor);
  }
}

// MR rows of A against R rows of B over all of K: per step, R 32-byte loads of B, each lane
// decoded once and FMA'd into MR rows (NA accumulator sets break the FMA chains when MR * R is
// small). Lanes 3 and 1 are done first (from odd_bytes), then 2 and 0 (from even_bytes), so at
// most 2R vectors of B are live. Each 128-K block's partial is promoted with sa * sb.
template <int MR, int R, int NA>
void gemv_tile(const float* a, int64_t lda, const float* sa, int64_t ldsa, const uint8_t* const* b,
               const float* const* sb, int64_t k, float* out, int64_t ldo) {
  const __m256i m7f = _mm256_set1_epi8(0x7F);
  __m256i nan_max = _mm256_setzero_si256();
  __m256 tot[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) tot[i][r] = _mm256_setzero_ps();
  for (int64_t b0 = 0, kb = 0; b0 < k; b0 += kBlockK, ++kb) {
    const int64_t b1 = std::min(k, b0 + kBlockK);
    __m256 acc[NA][MR][R];
#pragma GCC unroll 2
    for (int s = 0; s < NA; ++s)
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[s][i][r] = _mm256_setzero_ps();
    auto lane = [&](const __m256i* w, const float* ak, auto j) {
      constexpr int J = decltype(j)::value;
      __m256 bv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) bv[r] = e4m3_lane<J>(w[r]);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_loadu_ps(ak + i * lda + 8 * J);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[J % NA][i][r] = _mm256_fmadd_ps(av, bv[r], acc[J % NA][i][r]);
      }
    };
    auto step = [&](const __m256i* x, int64_t kk) {
      __m256i w[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) w[r] = odd_bytes(x[r]);
      lane(w, a + kk, std::integral_constant<int, 3>{});
      lane(w, a + kk, std::integral_constant<int, 1>{});
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) w[r] = even_bytes(x[r]);
      lane(w, a + kk, std::integral_constant<int, 2>{});
      lane(w, a + kk, std::integral_constant<int, 0>{});
    };
    int64_t kk = b0;
    for (; kk + kGemvStep <= b1; kk += kGemvStep) {
      __m256i x[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[r] + kk));
        if ((kk & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(b[r] + kk) + kGemvPrefetch, _MM_HINT_T0);
        nan_max = _mm256_max_epu8(nan_max, _mm256_and_si256(x[r], m7f));
      }
      step(x, kk);
    }
    if (kk < b1) {  // the K tail: zero-padded copies (A is zero padded by gemv_pack_a)
      __m256i x[R];
      for (int r = 0; r < R; ++r) {
        alignas(32) uint8_t buf[kGemvStep] = {};
        std::memcpy(buf, b[r] + kk, static_cast<size_t>(b1 - kk));
        x[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
        nan_max = _mm256_max_epu8(nan_max, _mm256_and_si256(x[r], m7f));
      }
      step(x, kk);
    }
    const __m256 unscale = _mm256_set1_ps(kGemvUnscale);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const float s_a = sa[i * ldsa + kb];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256 p = acc[0][i][r];
        if (NA > 1) p = _mm256_add_ps(p, acc[NA - 1][i][r]);
        tot[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(p, unscale), _mm256_set1_ps(s_a * sb[r][kb]), tot[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) out[i * ldo + r] = hsum(tot[i][r]);
  if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(nan_max, m7f)) != 0) {  // rare: find the rows
    for (int r = 0; r < R; ++r)
      if (std::any_of(b[r], b[r] + k, is_e4m3_nan))
        for (int i = 0; i < MR; ++i) out[i * ldo + r] = std::numeric_limits<float>::quiet_NaN();
  }
}

void gemv_avx2(const float* a, int64_t lda, const float* sa, int64_t ldsa, int mr, const uint8_t* const* b,
               const float* const* sb, int64_t k, float* out, int64_t ldo) {
  static_assert(kGemvRows == 3 && kGemvMr == 4, "gemv_avx2 is written for 3 B rows and up to 4 A rows");
  static constexpr GemvTileFn tiles[] = {&gemv_tile<1, 3, 2>, &gemv_tile<2, 3, 1>, &gemv_tile<3, 3, 1>, &gemv_tile<4, 3, 1>};
  run_gemv_tile(tiles, a, lda, sa, ldsa, mr, b, sb, k, out, ldo);
}

}  // namespace

KernelSet avx2_kernels() { return {&convert_avx2, &pack_b_avx2, &micro_avx2, &gemv_pack_a_avx2, &gemv_avx2}; }

}  // namespace gemm
}  // namespace dsv3
