// AVX-512 helpers shared by the AVX-512 (gemm_avx512.cpp) and AMX (gemm_amx.cpp) FP8 GEMM
// kernels: the exact e4m3 decoder, the 16 x 16 in-register transpose, tail masks and the
// promotion of a block's FP32 partial into the C accumulator.
//
// Include this AFTER the file's `#pragma GCC target(...)` (it has no includes of its own: the
// includer brings <immintrin.h> and gemm_kernels.h first): its functions must be compiled for
// that target to use the intrinsics, and they sit in an anonymous namespace, so each kernel file
// gets its own private copy (no weak symbol that code built for another ISA could link against).
#pragma once

namespace dsv3 {
namespace gemm {
namespace {

// The low n bits set, for n in [0, 16] (n <= 0: none, n >= 16: all): the lanes of a tail.
inline __mmask16 low_lanes16(int64_t n) {
  if (n <= 0) return static_cast<__mmask16>(0);
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 e4m3 bytes -> 16 fp32 equal to the e4m3 values / 256, exact, NaN kept: the 4 exponent and
// 3 mantissa bits move into fp16's fields (fp16's larger bias divides by 2^8, subnormals
// included), the NaN code S.1111.111 gets fp16 exponent 31 with a non-zero mantissa; vcvtph2ps
// widens to fp32 exactly. (The bit moves of gemm_avx2.cpp's e4m3x16_to_f16.)
inline __m512 e4m3x16_to_f32(__m128i bytes) {
  const __m256i x = _mm256_cvtepu8_epi16(bytes);
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi16(0x7F));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8);
  const __mmask16 nan = _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7F));
  const __m256i h = _mm256_or_si256(sign, _mm256_slli_epi16(mag, 7));
  return _mm512_cvtph_ps(_mm256_or_si256(h, _mm256_maskz_mov_epi16(nan, _mm256_set1_epi16(0x7E00))));
}

// In-register transpose of 16 x 16 32-bit elements (moves bits only: any payload, NaN codes and
// bf16 pairs included): pairs interleaved (unpack), 4 x 4 blocks within each 128-bit lane
// (shuffle_ps), then 128-bit lanes across registers in two rounds (shuffle_f32x4).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // per lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // per lane: a2 b2 a3 b3
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // per lane: column 0..3 of rows i..i+3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // r[4q + c] holds, in lane L, rows 4q..4q+3 of column 4L + c.
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);       // columns c, c+8 of rows 0..7
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);   // columns c+4, c+12 of rows 0..7
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);  // the same of rows 8..15
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
  }
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);      // column c
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);  // column c + 8
  }
}

// DeepSeek-V3's promotion of one row of 16 outputs: c[0..16) += partial * (s_a * s_b), where
// partial is a 128-K block's FP32 sum, s_a the A row's scale and s_b the 16 columns' scales.
inline void promote16(float* c, __m512 partial, float s_a, __m512 s_b) {
  _mm512_storeu_ps(c, _mm512_fmadd_ps(partial, _mm512_mul_ps(_mm512_set1_ps(s_a), s_b), _mm512_loadu_ps(c)));
}

}  // namespace
}  // namespace gemm
}  // namespace dsv3
