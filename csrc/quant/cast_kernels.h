// CPU building blocks of the FP8 casts: the amax of a contiguous segment and its quantization
// by one scale. Each has a portable version and an AVX2 one; cast_cpu.cpp picks at run time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/fp8.h"

namespace dsv3 {

// max(a, b) that propagates NaN from either side.
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

template <typename T>
float amax_portable(const T* p, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = static_cast<float>(p[i]);
    m = nan_max(m, v < 0 ? -v : v);
  }
  return m;
}

template <typename T>
void quantize_portable(const T* p, int64_t n, float sf, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = quantize_value(static_cast<float>(p[i]), sf);
}

// AVX2 versions (cast_avx2.cpp); only called when the CPU has AVX2, FMA and F16C.
template <typename T>
float amax_avx2(const T* p, int64_t n);
template <typename T>
void quantize_avx2(const T* p, int64_t n, float sf, uint8_t* out);

}  // namespace dsv3
