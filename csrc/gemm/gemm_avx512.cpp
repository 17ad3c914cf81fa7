// AVX-512 (F, BW, VL, DQ) + FMA + F16C versions of the FP8 GEMM building blocks
// (gemm_kernels.h), in the same packed layouts and number formats as the AVX2 set: a kNr = 16
// panel row is exactly one zmm, 16 e4m3 bytes decode with one vcvtph2ps zmm, and K tails are
// read with masked loads (no scalar loops, no reads past the end). The target pragma covers only
// this file and comes after every library #include (only our gemm_avx512_inline.h follows it),
// so header code (inline functions, templates instantiated elsewhere) is never compiled for
// AVX-512; gemm_cpu.cpp calls these only when active_cpu_isa() allows, which needs an explicit
// opt-in until they have run on such a CPU (kHighestVerifiedIsa in common/cpu_features.cpp).
//
// Results against the AVX2 set: convert and pack_b decode to the same exact values; micro does
// the same FMAs in the same order per output (one zmm per row instead of two ymm), so the packed
// path gives the same bits; the GEMV sums each 128-K block in a different order (16 lanes), so
// it agrees within FP32 rounding, like the AVX2 and portable GEMVs do with each other.
// tests/ops/test_gemm_avx512_emulated.py checks all of this on any x86-64 CPU, with the
// intrinsics emulated (SIMDe); tests/ops/test_gemm.py runs the real instructions where the CPU
// has them.

// GCC 12's AVX-512 intrinsics initialise their "undefined" vectors from themselves, which
// -Wuninitialized flags once they are inlined (GCC bug 105593, fixed in GCC 13): silenced for
// the intrinsics header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <type_traits>

#include "gemm_kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "gemm_avx512_inline.h"  // after the pragma: its helpers are compiled for this target

namespace dsv3 {
namespace gemm {
namespace {

void convert_avx512(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, e4m3x16_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  if (i < n) {  // the tail: masked load (zeros past n, no read past it) and masked store
    const __mmask16 m = low_lanes16(n - i);
    _mm512_mask_storeu_ps(dst + i, m, e4m3x16_to_f32(_mm_maskz_loadu_epi8(m, src + i)));
  }
}

// Decodes 16 rows x 16 K columns at a time and transposes them in registers: each panel row
// (kNr = 16 floats) is one zmm store. The K tail uses masked loads of the remaining columns.
void pack_b_avx512(const uint8_t* src, int64_t ld, int rows, int64_t k0, int64_t len, float* dst) {
  static_assert(kNr == 16, "pack_b_avx512 is written for 16-column panels");
  for (int64_t kk = 0; kk < len; kk += 16) {
    const int64_t cols = std::min<int64_t>(16, len - kk);
    const __mmask16 m = low_lanes16(cols);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      r[i] = i < rows ? e4m3x16_to_f32(_mm_maskz_loadu_epi8(m, src + i * ld + k0 + kk)) : _mm512_setzero_ps();
    transpose16(r);
    for (int t = 0; t < cols; ++t) _mm512_storeu_ps(dst + (kk + t) * kNr, r[t]);
  }
}

// The packed 6 x 16 micro-kernel: per K step, one B vector (the panel row) times six broadcast A
// values into 6 accumulators; at each block end the partials are promoted into C. Per output
// element these are the AVX2 micro-kernel's operations in its order, so the bits are the same.
void micro_avx512(const float* ap, int64_t lda, const float* bp, int64_t k0, int64_t k1, const float* asc,
                  const float* bsc, float* c, int64_t ldc) {
  static_assert(kMr == 6 && kNr == 16, "micro_avx512 is written for 6 x 16 tiles");
  for (int64_t b0 = k0; b0 < k1; b0 += kBlockK) {
    const int64_t len = std::min(kBlockK, k1 - b0);
    __m512 acc[kMr];
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t k = 0; k < len; ++k, ++ap, bp += kNr) {
      const __m512 bv = _mm512_loadu_ps(bp);
#pragma GCC unroll 6
      for (int i = 0; i < kMr; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(ap[i * lda]), bv, acc[i]);
    }
    const int64_t kb = b0 / kBlockK;
    const __m512 bs = _mm512_loadu_ps(bsc + kb * kNr);
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) promote16(c + i * ldc, acc[i], asc[kb * kMr + i], bs);
  }
}

// ---- GEMV ----
// The AVX2 GEMV's decoder (gemm_avx2.cpp explains it) on 64 bytes at a time: in lane J
// (J = 0..3) of a step, 32-bit element i holds B's byte 4i + J as an fp32 equal to the e4m3
// value * 2^-120 (subnormals too: DAZ is cleared while the kernel runs); NaN codes decode to a
// finite value and a running byte maximum flags them.
constexpr int kGemvStep = 64;           // B bytes per row per step (one zmm load)
constexpr float kGemvAScale = 0x1p64f;  // A is packed as value * 2^64 (products stay normal)
constexpr float kGemvUnscale = 0x1p56f;  // 2^120 / 2^64: restores a block partial before promotion
constexpr int64_t kGemvPrefetch = 1024;  // bytes ahead in each B row (as in the AVX2 GEMV)
static_assert(kBlockK % kGemvStep == 0, "a step never crosses a 128-K block");
static_assert(kGemvStep == 2 * kGemvAlign, "gemv_pack_a's last chunk is one or two kGemvAlign wide");

inline __m512i odd_bytes(__m512i x) { return _mm512_srai_epi16(x, 4); }
inline __m512i even_bytes(__m512i x) { return _mm512_srai_epi16(_mm512_slli_epi16(x, 8), 4); }

template <int J>
inline __m512 e4m3_lane(__m512i w) {
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(0x87F00000u));
  return _mm512_castsi512_ps(_mm512_and_si512(J >= 2 ? w : _mm512_slli_epi32(w, 16), mask));
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// A plain loop rather than std::any_of: a library template instantiated under this file's target
// could be emitted as a weak symbol that the AVX2 or portable code then links against.
bool has_nan_byte(const uint8_t* row, int64_t k) {
  for (int64_t i = 0; i < k; ++i)
    if (is_e4m3_nan(row[i])) return true;
  return false;
}

// A row in this GEMV's layout: value * 2^64, in chunks of 64 columns, where column 4i + J of a
// chunk is stored at offset 16J + i (the order e4m3_lane produces for B). The row is zero padded
// to round_up(k, 32) floats (kGemvAlign), so the last chunk may be 32 wide: there column 4i + J
// is at offset 8J + i, and the GEMV reads it with 8-lane masked loads.
void gemv_pack_a_avx512(const uint8_t* src, int64_t k, float* dst) {
  const int64_t padded = round_up(k, kGemvAlign);
  alignas(64) float tmp[kGemvStep];
  for (int64_t c = 0; c < k; c += kGemvStep) {
    const int64_t w = std::min<int64_t>(kGemvStep, padded - c), n = std::min(w, k - c), q = w / 4;
    convert_avx512(src + c, n, tmp);  // value / 256
    for (int64_t t = n; t < w; ++t) tmp[t] = 0.0f;
    for (int64_t t = 0; t < w; ++t) dst[c + (t & 3) * q + (t >> 2)] = tmp[t] * (kGemvAScale * kDecodeFactor);
  }
}

// MR rows of A against R rows of B over all of K: per step, R 64-byte loads of B, each lane
// decoded once and FMA'd into MR rows (NA accumulator sets break the FMA chains when MR * R is
// small). Lanes 3 and 1 first (from odd_bytes), then 2 and 0 (from even_bytes). Each 128-K
// block's partial is promoted with sa * sb. The K tail (last block only) is read with masked
// loads: zeros past K, which decode to 0 and meet A's zero padding.
template <int MR, int R, int NA>
void gemv_tile(const float* a, int64_t lda, const float* sa, int64_t ldsa, const uint8_t* const* b,
               const float* const* sb, int64_t k, float* out, int64_t ldo) {
  static_assert(NA == 1 || NA == 2, "one or two accumulator sets");
  const __m512i m7f = _mm512_set1_epi8(0x7F);
  const int64_t padded = round_up(k, kGemvAlign);
  __m512i nan_max = _mm512_setzero_si512();
  __m512 tot[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) tot[i][r] = _mm512_setzero_ps();
  for (int64_t b0 = 0, kb = 0; b0 < k; b0 += kBlockK, ++kb) {
    const int64_t b1 = std::min(k, b0 + kBlockK);
    __m512 acc[NA][MR][R];
#pragma GCC unroll 2
    for (int s = 0; s < NA; ++s)
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[s][i][r] = _mm512_setzero_ps();
    // Lane J against A's columns 4i + J: 16 floats at 16J in a 64-wide chunk, or, in a 32-wide
    // last chunk (Half), 8 floats at 8J (B's upper 32 bytes are zeros there).
    auto lane = [&](const __m512i* w, const float* ak, auto j, auto half) {
      constexpr int J = decltype(j)::value;
      constexpr bool kHalf = decltype(half)::value;
      __m512 bv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) bv[r] = e4m3_lane<J>(w[r]);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m512 av = kHalf ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(0x00FF), ak + i * lda + 8 * J)
                                : _mm512_loadu_ps(ak + i * lda + 16 * J);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[J % NA][i][r] = _mm512_fmadd_ps(av, bv[r], acc[J % NA][i][r]);
      }
    };
    auto step = [&](const __m512i* x, int64_t kk, auto half) {
      __m512i w[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) w[r] = odd_bytes(x[r]);
      lane(w, a + kk, std::integral_constant<int, 3>{}, half);
      lane(w, a + kk, std::integral_constant<int, 1>{}, half);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) w[r] = even_bytes(x[r]);
      lane(w, a + kk, std::integral_constant<int, 2>{}, half);
      lane(w, a + kk, std::integral_constant<int, 0>{}, half);
    };
    int64_t kk = b0;
    for (; kk + kGemvStep <= b1; kk += kGemvStep) {
      __m512i x[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        x[r] = _mm512_loadu_si512(b[r] + kk);
        _mm_prefetch(reinterpret_cast<const char*>(b[r] + kk) + kGemvPrefetch, _MM_HINT_T0);
        nan_max = _mm512_max_epu8(nan_max, _mm512_and_si512(x[r], m7f));
      }
      step(x, kk, std::false_type{});
    }
    if (kk < b1) {
      const __mmask64 m = _cvtu64_mask64(~uint64_t{0} >> (kGemvStep - (b1 - kk)));  // b1 - kk bytes
      __m512i x[R];
      for (int r = 0; r < R; ++r) {
        x[r] = _mm512_maskz_loadu_epi8(m, b[r] + kk);
        nan_max = _mm512_max_epu8(nan_max, _mm512_and_si512(x[r], m7f));
      }
      if (kk + kGemvStep <= padded)
        step(x, kk, std::false_type{});
      else
        step(x, kk, std::true_type{});
    }
    const __m512 unscale = _mm512_set1_ps(kGemvUnscale);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const float s_a = sa[i * ldsa + kb];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m512 p = acc[0][i][r];
        if (NA > 1) p = _mm512_add_ps(p, acc[NA - 1][i][r]);
        tot[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(p, unscale), _mm512_set1_ps(s_a * sb[r][kb]), tot[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) out[i * ldo + r] = _mm512_reduce_add_ps(tot[i][r]);
  if (_mm512_cmpeq_epi8_mask(nan_max, m7f) != 0) {  // rare: find the rows
    for (int r = 0; r < R; ++r)
      if (has_nan_byte(b[r], k))
        for (int i = 0; i < MR; ++i) out[i * ldo + r] = std::numeric_limits<float>::quiet_NaN();
  }
}

void gemv_avx512(const float* a, int64_t lda, const float* sa, int64_t ldsa, int mr, const uint8_t* const* b,
                 const float* const* sb, int64_t k, float* out, int64_t ldo) {
  static_assert(kGemvRows == 3 && kGemvMr == 4, "gemv_avx512 is written for 3 B rows and up to 4 A rows");
  static constexpr GemvTileFn tiles[] = {&gemv_tile<1, 3, 2>, &gemv_tile<2, 3, 1>, &gemv_tile<3, 3, 1>, &gemv_tile<4, 3, 1>};
  run_gemv_tile(tiles, a, lda, sa, ldsa, mr, b, sb, k, out, ldo);
}

}  // namespace

KernelSet avx512_kernels() {
  return {&convert_avx512, &pack_b_avx512, &micro_avx512, &gemv_pack_a_avx512, &gemv_avx512};
}

}  // namespace gemm
}  // namespace dsv3
