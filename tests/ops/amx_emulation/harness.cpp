// Runs the AMX-BF16 FP8 GEMM path (csrc/gemm/gemm_amx.cpp, built against the emulating
// immintrin.h beside this file, and the real blocking of csrc/gemm/gemm_amx_driver.h) on random
// inputs:
//   decode_row, pack_b: bit for bit the bf16 of the exact e4m3 value / 256 (every byte code, NaN
//                       kept), in the documented layouts (VNNI for B), zeros in the K padding,
//                       nothing written past it;
//   tile:               one 32 x 32 tile against a float64 reference of the promoted sum, every
//                       K tail, random C accumulator, NaN bytes in one A row and one B column;
//   run_amx_gemm:       whole GEMMs with M, N, K tails (several B slabs, padded strips and
//                       panels), C accumulate and NaN bytes / scales, on 1 and on 3 threads (the
//                       tile configuration is per thread): float64 reference, per-output error
//                       relative to the sum of |terms| and calc_diff.
// Usage: harness SEED. Prints the failures (first 20) and exits 1 if there are any.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "../avx512_emulation/harness_common.h"
#include "gemm_amx_driver.h"
#include "gemm_kernels.h"

using namespace dsv3::gemm;
using harness::random_bytes;
using harness::random_scale;
using harness::rng;

namespace {

constexpr uint16_t kCanary = 0xBEEF;
constexpr double kTileTolerance = 1e-5;  // of the sum of |terms|: FP32 sums of <= 128 exact products

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The bf16 that decode_row / pack_b must write for a byte: the top half of the fp32 e4m3 / 256
// (whose bottom half must be zero: the conversion is exact).
uint16_t expected_bf16(uint8_t v) {
  const float f = e4m3_to_float_div256(v);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (!is_e4m3_nan(v) && (bits & 0xFFFF) != 0) std::printf("not exact in bf16: 0x%02x\n", v), std::abort();
  return static_cast<uint16_t>(bits >> 16);
}

bool same_bf16(uint16_t want, uint16_t got) {
  const bool want_nan = (want & 0x7F80) == 0x7F80 && (want & 0x7F) != 0;
  const bool got_nan = (got & 0x7F80) == 0x7F80 && (got & 0x7F) != 0;
  return want_nan ? got_nan : want == got;
}

void check_decode_row(const AmxKernelSet& ks) {
  for (int64_t k = 1; k <= 130; ++k) {
    std::vector<uint8_t> src = random_bytes(k, true);
    if (k >= 2) src[0] = 0x7F, src[k - 1] = 0xFF;
    const int64_t kp = round_up(k, kAmxK);
    std::vector<uint16_t> got(kp + 40, kCanary);
    ks.decode_row(src.data(), k, got.data());
    for (int64_t i = 0; i < kp + 40; ++i) {
      const uint16_t want = i < k ? expected_bf16(src[i]) : i < kp ? 0 : kCanary;
      CHECK(same_bf16(want, got[i]), "decode_row k=%ld i=%ld: 0x%04x vs 0x%04x", k, i, want, got[i]);
    }
  }
  uint8_t codes[256];
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(i);
  uint16_t got[256];
  ks.decode_row(codes, 256, got);
  for (int i = 0; i < 256; ++i)
    CHECK(same_bf16(expected_bf16(codes[i]), got[i]), "decode_row code 0x%02x gave 0x%04x", i, got[i]);
}

void check_pack_b(const AmxKernelSet& ks) {
  for (int rows = 0; rows <= kAmxPanelN; ++rows)
    for (int64_t k : {1, 2, 7, 16, 31, 32, 33, 63, 64, 100, 128, 129, 257}) {
      const int64_t ld = k + static_cast<int64_t>(rng() % 5), kp = round_up(k, kAmxK);
      const std::vector<uint8_t> src = random_bytes(std::max(rows, 1) * ld, true);
      const size_t size = kp * kAmxPanelN;
      std::vector<uint16_t> got(size + 64, kCanary);
      ks.pack_b(src.data(), ld, rows, k, got.data());
      for (int64_t kk = 0; kk < kp; ++kk)
        for (int r = 0; r < kAmxPanelN; ++r) {
          const uint16_t want = kk < k && r < rows ? expected_bf16(src[r * ld + kk]) : 0;
          const uint16_t g = got[(kk / 2) * 2 * kAmxPanelN + 2 * r + kk % 2];
          CHECK(same_bf16(want, g), "pack_b rows=%d k=%ld kk=%ld r=%d: 0x%04x vs 0x%04x", rows, k, kk, r, want, g);
        }
      for (size_t i = size; i < got.size(); ++i)
        CHECK(got[i] == kCanary, "pack_b rows=%d k=%ld wrote past %zu", rows, k, size);
    }
}

// The float64 reference of one output: c + sum_kb (sum_k a * b) * sa[kb] * sb[kb], and the sum of
// the |terms| (|c| included) that bounds the FP32 rounding.
struct Ref {
  double value, magnitude;
  bool nan;
};

Ref reference(const uint8_t* a, const uint8_t* b, int64_t k, const float* sa, const float* sb, float c) {
  Ref r{c, std::fabs(c), false};
  for (int64_t kb = 0; kb * kBlockK < k; ++kb) {
    double part = 0, part_abs = 0;
    for (int64_t kk = kb * kBlockK; kk < std::min(k, (kb + 1) * kBlockK); ++kk) {
      if (is_e4m3_nan(a[kk]) || is_e4m3_nan(b[kk])) r.nan = true;
      const double p = static_cast<double>(e4m3_to_float_div256(a[kk])) * 256.0 * e4m3_to_float_div256(b[kk]) * 256.0;
      part += p, part_abs += std::fabs(p);
    }
    const double s = static_cast<double>(sa[kb]) * sb[kb];
    if (std::isnan(s)) r.nan = true;
    r.value += part * s, r.magnitude += part_abs * std::fabs(s);
  }
  return r;
}

// Compares got with the reference of each output; returns the worst relative error.
double compare(const char* what, const Ref& want, float got, int64_t i, int64_t j) {
  if (want.nan) {
    CHECK(std::isnan(got), "%s (%ld, %ld): expected NaN, got %g", what, i, j, got);
    return 0;
  }
  const double err = std::fabs(got - want.value) / std::max(want.magnitude, 1e-300);
  CHECK(err < kTileTolerance, "%s (%ld, %ld): %.9g vs %.9g (error %.3g)", what, i, j, got, want.value, err);
  return err;
}

void check_tile(const AmxKernelSet& ks) {
  double worst = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t k = trial < 12 ? std::vector<int64_t>{1, 31, 32, 33, 127, 128, 129, 160, 255, 256, 257, 600}[trial]
                                 : 1 + static_cast<int64_t>(rng() % 700);
    const int64_t num_kb = (k + kBlockK - 1) / kBlockK, kp = round_up(k, kAmxK), lda = kp + 8 * (rng() % 3);
    std::vector<uint8_t> a8 = random_bytes(kAmxMr * k, false), b8 = random_bytes(kAmxNr * k, false);
    const bool nan = trial % 4 == 3;
    const int64_t nan_i = static_cast<int64_t>(rng() % kAmxMr), nan_j = static_cast<int64_t>(rng() % kAmxNr);
    if (nan) a8[nan_i * k + rng() % k] = 0x7F, b8[nan_j * k + rng() % k] = 0xFF;
    std::vector<uint16_t> a(kAmxMr * lda), b(2 * kp * kAmxPanelN);
    for (int i = 0; i < kAmxMr; ++i) ks.decode_row(a8.data() + i * k, k, a.data() + i * lda);
    ks.pack_b(b8.data(), k, kAmxPanelN, k, b.data());
    ks.pack_b(b8.data() + kAmxPanelN * k, k, kAmxPanelN, k, b.data() + kp * kAmxPanelN);
    std::vector<float> sa(kAmxMr * num_kb), sb(kAmxNr * num_kb), asc(num_kb * kAmxMr), bsc(num_kb * kAmxNr);
    for (auto& v : sa) v = random_scale(-12, 8);
    for (auto& v : sb) v = random_scale(-12, 8);
    for (int64_t kb = 0; kb < num_kb; ++kb) {
      for (int i = 0; i < kAmxMr; ++i) asc[kb * kAmxMr + i] = sa[i * num_kb + kb];
      for (int j = 0; j < kAmxNr; ++j) bsc[kb * kAmxNr + j] = sb[j * num_kb + kb] * kDecodeScale;
    }
    const int64_t ldc = kAmxNr + static_cast<int64_t>(rng() % 5);
    std::vector<float> c(kAmxMr * ldc);
    // C of the size of the promoted sums (|a b| ~ 10^4 per block, scales ~ 2^-16 each): a larger C
    // would hide the products' errors in the tolerance.
    for (auto& v : c) v = static_cast<float>(static_cast<int64_t>(rng() % 2001) - 1000) / 1000.0f;
    std::vector<float> got = c;
    ks.tile(a.data(), lda, b.data(), kp * kAmxPanelN, k, asc.data(), bsc.data(), got.data(), ldc);
    for (int64_t i = 0; i < kAmxMr; ++i)
      for (int64_t j = 0; j < kAmxNr; ++j) {
        const Ref want = reference(a8.data() + i * k, b8.data() + j * k, k, sa.data() + i * num_kb,
                                   sb.data() + j * num_kb, c[i * ldc + j]);
        worst = std::max(worst, compare("tile", want, got[i * ldc + j], i, j));
      }
  }
  std::printf("tile: worst error %.3g of the sum of |terms|\n", worst);
}

// Runs fn(t) for t < tasks on `threads` std::threads, tasks handed out from a shared counter.
struct Threads {
  int threads;
  template <typename Fn>
  void operator()(int64_t tasks, const Fn& fn) const {
    std::atomic<int64_t> next{0};
    auto body = [&] {
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) fn(t);
    };
    std::vector<std::thread> pool;
    for (int w = 1; w < threads; ++w) pool.emplace_back(body);
    body();
    for (auto& th : pool) th.join();
  }
};

void check_gemm(const AmxKernelSet& ks, int64_t m, int64_t n, int64_t k, int threads, bool with_c, int nan_case) {
  const int64_t num_kb = (k + kBlockK - 1) / kBlockK, lda = k + static_cast<int64_t>(rng() % 3);
  const int64_t ldb = k + static_cast<int64_t>(rng() % 3);
  std::vector<uint8_t> a8 = random_bytes(m * lda, false), b8 = random_bytes(n * ldb, false);
  std::vector<float> sa(m * num_kb), sb(n * num_kb), c(with_c ? m * n : 0);
  for (auto& v : sa) v = random_scale(-12, 8);
  for (auto& v : sb) v = random_scale(-12, 8);
  for (auto& v : c) v = static_cast<float>(static_cast<int64_t>(rng() % 2001) - 1000) / 1000.0f;
  if (nan_case == 1) {  // payload NaN bytes: one A row, one B row
    a8[(rng() % m) * lda + rng() % k] = 0x7F;
    b8[(rng() % n) * ldb + rng() % k] = 0xFF;
  } else if (nan_case == 2) {  // a NaN scale
    sa[rng() % sa.size()] = NAN;
  }
  std::vector<float> d(m * n, NAN);
  std::vector<int> writes(m * n, 0);
  run_amx_gemm(
      ks, m, n, k, a8.data(), lda, b8.data(), ldb, [&](int64_t i, int64_t kb) { return sa[i * num_kb + kb]; },
      [&](int64_t j, int64_t kb) { return sb[j * num_kb + kb]; }, Threads{threads},
      [&](int64_t i, int64_t j, float v) {
        d[i * n + j] = with_c ? v + c[i * n + j] : v;
        ++writes[i * n + j];
      });
  double worst = 0, sxy = 0, sxx_yy = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      CHECK(writes[i * n + j] == 1, "gemm %ldx%ldx%ld: output (%ld, %ld) stored %d times", m, n, k, i, j,
            writes[i * n + j]);
      const Ref want = reference(a8.data() + i * lda, b8.data() + j * ldb, k, sa.data() + i * num_kb,
                                 sb.data() + j * num_kb, with_c ? c[i * n + j] : 0.0f);
      const float got = d[i * n + j];
      worst = std::max(worst, compare("gemm", want, got, i, j));
      if (!want.nan && !std::isnan(got)) sxy += want.value * got, sxx_yy += want.value * want.value + double(got) * got;
    }
  const double diff = sxx_yy > 0 ? 1 - 2 * sxy / sxx_yy : 0;
  CHECK(diff < 1e-9, "gemm %ldx%ldx%ld: calc_diff %.3g", m, n, k, diff);
  const char* nan = nan_case == 1 ? ", NaN bytes" : nan_case == 2 ? ", NaN scale" : "";
  std::printf("gemm %4ld x %4ld x %4ld, %d thread(s)%s%s: worst error %.3g of the sum of |terms|, calc_diff %.3g\n",
              m, n, k, threads, with_c ? ", C" : "", nan, worst, diff);
}

}  // namespace

int main(int argc, char** argv) {
  if (!harness::seed_from_args(argc, argv)) return 2;
  const AmxKernelSet amx = amx_kernels();
  check_decode_row(amx);
  check_pack_b(amx);
  check_tile(amx);
  struct Case {
    int64_t m, n, k;
    int threads;
    bool with_c;
    int nan_case;
  };
  for (const Case& t : {Case{1, 1, 1, 1, false, 0}, Case{17, 33, 100, 1, true, 0}, Case{32, 32, 128, 3, false, 0},
                        Case{33, 31, 129, 3, true, 1}, Case{64, 600, 300, 3, false, 0}, Case{100, 70, 576, 3, true, 2},
                        Case{5, 530, 385, 1, false, 1}, Case{70, 1100, 64, 3, true, 0}, Case{31, 7, 7, 3, false, 1}})
    check_gemm(amx, t.m, t.n, t.k, t.threads, t.with_c, t.nan_case);
  return harness::report();
}
