// Portable (plain C++) versions of the FP8 GEMM building blocks of gemm_kernels.h: the
// reference the vector versions are tested against, and the path for CPUs without AVX2.
#include <algorithm>
#include <vector>

#include "gemm_kernels.h"

namespace dsv3 {
namespace gemm {
namespace {

const float* decode_table() {
  static const std::vector<float> lut = [] {
    std::vector<float> t(256);
    for (int v = 0; v < 256; ++v) t[v] = e4m3_to_float_div256(static_cast<uint8_t>(v));
    return t;
  }();
  return lut.data();
}

void convert_portable(const uint8_t* src, int64_t n, float* dst) {
  const float* lut = decode_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

void pack_b_portable(const uint8_t* src, int64_t ld, int rows, int64_t k0, int64_t len, float* dst) {
  const float* lut = decode_table();
  for (int64_t kk = 0; kk < len; ++kk)
    for (int r = 0; r < kNr; ++r) dst[kk * kNr + r] = r < rows ? lut[src[r * ld + k0 + kk]] : 0.0f;
}

void micro_portable(const float* ap, int64_t lda, const float* bp, int64_t k0, int64_t k1, const float* asc,
                    const float* bsc, float* c, int64_t ldc) {
  for (int64_t b0 = k0; b0 < k1; b0 += kBlockK) {
    const int64_t len = std::min(kBlockK, k1 - b0);
    float acc[kMr][kNr] = {};
    for (int64_t k = 0; k < len; ++k, bp += kNr)
      for (int i = 0; i < kMr; ++i)
        for (int j = 0; j < kNr; ++j) acc[i][j] += ap[i * lda + b0 - k0 + k] * bp[j];
    const int64_t kb = b0 / kBlockK;
    for (int i = 0; i < kMr; ++i)
      for (int j = 0; j < kNr; ++j) c[i * ldc + j] += acc[i][j] * (asc[kb * kMr + i] * bsc[kb * kNr + j]);
  }
}

// A for the portable GEMV: value / 256, row-major, zero padded.
void gemv_pack_a_portable(const uint8_t* src, int64_t k, float* dst) {
  convert_portable(src, k, dst);
  const int64_t padded = (k + kGemvAlign - 1) / kGemvAlign * kGemvAlign;
  std::fill(dst + k, dst + padded, 0.0f);
}

void gemv_portable(const float* a, int64_t lda, const float* sa, int64_t ldsa, int mr, const uint8_t* const* b,
                   const float* const* sb, int64_t k, float* out, int64_t ldo) {
  const float* lut = decode_table();
  for (int i = 0; i < mr; ++i)
    for (int r = 0; r < kGemvRows; ++r) {
      float tot = 0.0f;
      for (int64_t b0 = 0, kb = 0; b0 < k; b0 += kBlockK, ++kb) {
        float part = 0.0f;
        for (int64_t kk = b0; kk < std::min(k, b0 + kBlockK); ++kk) part += a[i * lda + kk] * lut[b[r][kk]];
        tot += part * (sa[i * ldsa + kb] * (sb[r][kb] * kDecodeScale));
      }
      out[i * ldo + r] = tot;
    }
}

}  // namespace

KernelSet portable_kernels() { return {&convert_portable, &pack_b_portable, &micro_portable, &gemv_pack_a_portable, &gemv_portable}; }

}  // namespace gemm
}  // namespace dsv3
