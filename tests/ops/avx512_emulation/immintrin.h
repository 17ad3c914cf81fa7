// Stands in for <immintrin.h> when tests/ops/test_gemm_avx512_emulated.py compiles
// csrc/gemm/gemm_avx512.cpp (its target pragma removed) for a CPU without AVX-512: SIMDe
// (libsimde-dev) implements the AVX-512 intrinsics in portable C, and this file adds the few
// that SIMDe 0.7.4 lacks, each written from Intel's definition of the instruction.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#include <xmmintrin.h>  // _mm_getcsr, _mm_prefetch (SSE: native on every x86-64)

#include <cmath>
#include <cstdint>
#include <cstring>

typedef simde__mmask8 __mmask8;
typedef simde__mmask16 __mmask16;
typedef simde__mmask64 __mmask64;

namespace emu {

template <typename V, typename T, int N>
inline void to_array(V v, T (&out)[N]) {
  static_assert(sizeof(V) == sizeof(T) * N, "vector size");
  std::memcpy(out, &v, sizeof(V));
}

template <typename V, typename T, int N>
inline V from_array(const T (&in)[N]) {
  static_assert(sizeof(V) == sizeof(T) * N, "vector size");
  V v;
  std::memcpy(&v, in, sizeof(V));
  return v;
}

// IEEE binary16 -> binary32, exact (vcvtph2ps).
inline float half_to_float(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  float f;
  if (e == 0)
    f = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31)
    f = m ? NAN : INFINITY;
  else
    f = std::ldexp(static_cast<float>(1024 + m), e - 25);
  return (h >> 15) ? -f : f;
}

inline simde__m512 cvtph_ps(simde__m256i a) {
  uint16_t h[16];
  float f[16];
  to_array(a, h);
  for (int i = 0; i < 16; ++i) f[i] = half_to_float(h[i]);
  return from_array<simde__m512>(f);
}

// Masked loads read only the selected elements (the others are zero) and so never fault past them.
template <typename V, typename T, int N>
inline V maskz_loadu(uint64_t k, const void* p) {
  T v[N] = {};
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1) std::memcpy(&v[i], static_cast<const char*>(p) + i * sizeof(T), sizeof(T));
  return from_array<V>(v);
}

inline void mask_storeu_ps(float* p, uint16_t k, simde__m512 v) {
  float f[16];
  to_array(v, f);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) p[i] = f[i];
}

inline uint16_t cmpeq_epi16_mask(simde__m256i a, simde__m256i b) {
  int16_t x[16], y[16];
  to_array(a, x);
  to_array(b, y);
  uint16_t m = 0;
  for (int i = 0; i < 16; ++i) m |= static_cast<uint16_t>(x[i] == y[i]) << i;
  return m;
}

inline simde__m256i maskz_mov_epi16(uint16_t k, simde__m256i a) {
  int16_t x[16];
  to_array(a, x);
  for (int i = 0; i < 16; ++i)
    if (!((k >> i) & 1)) x[i] = 0;
  return from_array<simde__m256i>(x);
}

// One rounding per element, as vfmadd does (SIMDe's fallback multiplies and adds: two roundings).
inline simde__m512 fmadd_ps(simde__m512 a, simde__m512 b, simde__m512 c) {
  float x[16], y[16], z[16];
  to_array(a, x);
  to_array(b, y);
  to_array(c, z);
  for (int i = 0; i < 16; ++i) z[i] = std::fma(x[i], y[i], z[i]);
  return from_array<simde__m512>(z);
}

// A horizontal sum (the order of the additions differs between compilers; any order passes).
inline float reduce_add_ps(simde__m512 v) {
  float x[16];
  to_array(v, x);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) x[i] += x[i + w];
  return x[0];
}

}  // namespace emu

#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(a) emu::cvtph_ps(a)
#undef _mm_maskz_loadu_epi8
#define _mm_maskz_loadu_epi8(k, p) (emu::maskz_loadu<simde__m128i, uint8_t, 16>((k), (p)))
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8(k, p) (emu::maskz_loadu<simde__m512i, uint8_t, 64>((k), (p)))
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) (emu::maskz_loadu<simde__m512, float, 16>((k), (p)))
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, v) emu::mask_storeu_ps((p), (k), (v))
#undef _mm256_cmpeq_epi16_mask
#define _mm256_cmpeq_epi16_mask(a, b) emu::cmpeq_epi16_mask((a), (b))
#undef _mm256_maskz_mov_epi16
#define _mm256_maskz_mov_epi16(k, a) emu::maskz_mov_epi16((k), (a))
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps(a, b, c) emu::fmadd_ps((a), (b), (c))
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(v) emu::reduce_add_ps(v)
#undef _cvtu64_mask64
#define _cvtu64_mask64(x) static_cast<uint64_t>(x)
#ifndef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm8) \
  simde_mm512_castsi512_ps(simde_mm512_shuffle_i32x4(simde_mm512_castps_si512(a), simde_mm512_castps_si512(b), imm8))
#endif
