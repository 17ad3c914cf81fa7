// Runs the AVX-512 FP8 GEMM kernel set (csrc/gemm/gemm_avx512.cpp, built against the SIMDe
// stand-in immintrin.h beside this file) against the portable and AVX2 sets on random inputs:
//   convert, pack_b: the same bits as the portable decoder (every byte code, every tail length),
//                    nothing written past the requested range;
//   micro:           the same bits as the AVX2 micro-kernel (same FMAs in the same order);
//   gemv_pack_a + gemv: within 1e-5 (relative to the sum of |terms|) of a float64 reference, for
//                    every K tail of the 64-byte steps and 32-wide last chunks, 1 to 4 rows of A;
//                    a NaN byte in a B row gives NaN in its column only; e4m3 subnormals exact;
//                    gemv_pack_a stays within round_up(k, 32) floats.
// Usage: harness SEED. Prints the failures (first 20) and exits 1 if there are any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "harness_common.h"
#include "gemm_kernels.h"

using namespace dsv3::gemm;
using harness::random_bytes;
using harness::random_scale;
using harness::rng;

namespace {

constexpr float kCanary = 12345.678f;

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }
bool same_value(float a, float b) { return (std::isnan(a) && std::isnan(b)) || same_bits(a, b); }

void check_convert(const KernelSet& ref, const KernelSet& ks) {
  for (int64_t n = 0; n <= 100; ++n) {
    std::vector<uint8_t> src = random_bytes(n + 64, true);
    if (n >= 2) src[0] = 0x7F, src[n - 1] = 0xFF;
    std::vector<float> want(n + 16, kCanary), got(n + 16, kCanary);
    ref.convert(src.data(), n, want.data());
    ks.convert(src.data(), n, got.data());
    for (int64_t i = 0; i < n + 16; ++i) CHECK(same_value(want[i], got[i]), "convert n=%ld i=%ld", n, i);
  }
  uint8_t codes[256];
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(i);
  float want[256], got[256];
  ref.convert(codes, 256, want);
  ks.convert(codes, 256, got);
  for (int i = 0; i < 256; ++i) {
    CHECK(same_value(want[i], got[i]), "convert code 0x%02x: %g vs %g", i, want[i], got[i]);
    CHECK(std::isnan(got[i]) == is_e4m3_nan(static_cast<uint8_t>(i)), "NaN code 0x%02x", i);
  }
}

void check_pack_b(const KernelSet& ref, const KernelSet& ks) {
  for (int rows = 1; rows <= kNr; ++rows)
    for (int64_t k0 : {0, 128, 256})
      for (int64_t len : {1, 7, 8, 15, 16, 17, 31, 33, 100, 128, 255, 256}) {
        const int64_t ld = k0 + len + static_cast<int64_t>(rng() % 3);
        const std::vector<uint8_t> src = random_bytes(rows * ld, true);
        std::vector<float> want(len * kNr + 64, kCanary), got(len * kNr + 64, kCanary);
        ref.pack_b(src.data(), ld, rows, k0, len, want.data());
        ks.pack_b(src.data(), ld, rows, k0, len, got.data());
        for (size_t i = 0; i < want.size(); ++i)
          CHECK(same_value(want[i], got[i]), "pack_b rows=%d k0=%ld len=%ld i=%zu", rows, k0, len, i);
      }
}

void check_micro(const KernelSet& decode, const KernelSet& ref, const KernelSet& ks) {
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t k0 = 128 * static_cast<int64_t>(rng() % 3), k1 = k0 + 1 + static_cast<int64_t>(rng() % 300);
    const int64_t len = k1 - k0, lda = len + static_cast<int64_t>(rng() % 20), ldc = kNr + static_cast<int64_t>(rng() % 8);
    const int64_t num_kb = (k1 + kBlockK - 1) / kBlockK;
    const std::vector<uint8_t> a8 = random_bytes(kMr * lda, false), b8 = random_bytes(kNr * len, false);
    std::vector<float> ap(kMr * lda), bp(len * kNr);
    decode.convert(a8.data(), kMr * lda, ap.data());
    decode.pack_b(b8.data(), len, kNr, 0, len, bp.data());
    std::vector<float> asc(num_kb * kMr), bsc(num_kb * kNr), c(kMr * ldc);
    for (auto& v : asc) v = random_scale(-7, 8);
    for (auto& v : bsc) v = random_scale(9, 8);
    for (auto& v : c) v = static_cast<float>(static_cast<int64_t>(rng() % 2001) - 1000) / 7.0f;
    std::vector<float> want = c, got = c;
    ref.micro(ap.data(), lda, bp.data(), k0, k1, asc.data(), bsc.data(), want.data(), ldc);
    ks.micro(ap.data(), lda, bp.data(), k0, k1, asc.data(), bsc.data(), got.data(), ldc);
    for (size_t i = 0; i < want.size(); ++i)
      CHECK(same_bits(want[i], got[i]), "micro k0=%ld k1=%ld i=%zu: %.9g vs %.9g", k0, k1, i, want[i], got[i]);
  }
}

// One GEMV call of mr A rows against kGemvRows B rows; nan_case 1 or 2 puts a NaN byte in one B
// row (its last byte, or anywhere). Returns the worst relative error of the finite outputs.
double check_gemv_once(const KernelSet& decode, const KernelSet& ks, int64_t k, int mr, int nan_case) {
  const int64_t num_kb = (k + kBlockK - 1) / kBlockK, padded = (k + kGemvAlign - 1) / kGemvAlign * kGemvAlign;
  const int64_t lda = padded + 16;
  const std::vector<uint8_t> a8 = random_bytes(mr * k, false);
  std::vector<uint8_t> b8[kGemvRows];
  std::vector<float> sb[kGemvRows];
  const uint8_t* brow[kGemvRows];
  const float* srow[kGemvRows];
  for (int r = 0; r < kGemvRows; ++r) {
    b8[r] = random_bytes(k, false);
    sb[r].resize(num_kb);
    for (auto& v : sb[r]) v = random_scale(-10, 10);
    brow[r] = b8[r].data(), srow[r] = sb[r].data();
  }
  int nan_row = -1;
  if (nan_case > 0) {
    nan_row = static_cast<int>(rng() % kGemvRows);
    b8[nan_row][nan_case == 1 ? k - 1 : static_cast<int64_t>(rng() % k)] = (rng() & 1) ? 0x7F : 0xFF;
  }
  std::vector<float> sa(mr * num_kb);
  for (auto& v : sa) v = random_scale(-10, 10);
  std::vector<float> a(mr * lda, kCanary);
  for (int i = 0; i < mr; ++i) ks.gemv_pack_a(a8.data() + i * k, k, a.data() + i * lda);
  for (int i = 0; i < mr; ++i)
    for (int64_t t = padded; t < lda; ++t) CHECK(a[i * lda + t] == kCanary, "gemv_pack_a wrote past %ld (k=%ld)", padded, k);
  float out[kGemvMr * kGemvRows];
  std::fill(out, out + kGemvMr * kGemvRows, kCanary);
  ks.gemv(a.data(), lda, sa.data(), num_kb, mr, brow, srow, k, out, kGemvRows);

  double worst = 0;
  std::vector<float> ad(k), bd(k);
  for (int i = 0; i < mr; ++i)
    for (int r = 0; r < kGemvRows; ++r) {
      const float got = out[i * kGemvRows + r];
      if (r == nan_row) {
        CHECK(std::isnan(got), "gemv NaN row: k=%ld mr=%d r=%d gave %g", k, mr, r, got);
        continue;
      }
      decode.convert(a8.data() + i * k, k, ad.data());  // value / 256
      decode.convert(b8[r].data(), k, bd.data());
      double want = 0, magnitude = 0;
      for (int64_t kb = 0; kb < num_kb; ++kb) {
        double part = 0, part_abs = 0;
        for (int64_t kk = kb * kBlockK; kk < std::min(k, (kb + 1) * kBlockK); ++kk) {
          part += static_cast<double>(ad[kk]) * bd[kk];
          part_abs += std::fabs(static_cast<double>(ad[kk]) * bd[kk]);
        }
        const double scale = static_cast<double>(sa[i * num_kb + kb]) * sb[r][kb] * kDecodeScale;
        want += part * scale, magnitude += part_abs * scale;
      }
      const double err = std::fabs(got - want) / std::max(magnitude, 1e-300);
      worst = std::max(worst, err);
      CHECK(err < 1e-5, "gemv k=%ld mr=%d i=%d r=%d: %.9g vs %.9g", k, mr, i, r, got, want);
    }
  return worst;
}

void check_gemv(const KernelSet& decode, const KernelSet& ks) {
  double worst = 0;
  for (int64_t k : {1, 5, 16, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 159, 160, 161, 191, 192, 193, 255,
                    256, 257, 300, 385, 448, 449, 575, 576, 700})
    for (int mr = 1; mr <= kGemvMr; ++mr)
      for (int nan_case = 0; nan_case < 3; ++nan_case) worst = std::max(worst, check_gemv_once(decode, ks, k, mr, nan_case));
  std::printf("gemv: worst error %.3g of the sum of |terms|\n", worst);

  // e4m3 subnormals in B (decoded to fp32 subnormals) against 1.0 in A, unit scales: exact.
  for (int code = 1; code < 8; ++code) {
    const int64_t k = 200;
    std::vector<uint8_t> a8(k, 0), b8(k, 0);
    a8[150] = 0x38;  // 1.0
    b8[150] = static_cast<uint8_t>(0x80 | code);
    std::vector<float> a(k + 64);
    ks.gemv_pack_a(a8.data(), k, a.data());
    const uint8_t* brow[kGemvRows] = {b8.data(), b8.data(), b8.data()};
    const float ones[2] = {1.0f, 1.0f};
    const float* srow[kGemvRows] = {ones, ones, ones};
    float out[kGemvRows];
    ks.gemv(a.data(), k + 64, ones, 2, 1, brow, srow, k, out, kGemvRows);
    CHECK(out[0] == -std::ldexp(static_cast<float>(code), -9), "subnormal code %d gave %g", code, out[0]);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!harness::seed_from_args(argc, argv)) return 2;
  const KernelSet portable = portable_kernels(), avx2 = avx2_kernels(), avx512 = avx512_kernels();
  check_convert(portable, avx512);
  check_pack_b(portable, avx512);
  check_micro(portable, avx2, avx512);
  check_gemv(portable, avx512);
  return harness::report();
}
