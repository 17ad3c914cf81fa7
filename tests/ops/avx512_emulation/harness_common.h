// What the emulation harnesses (avx512_emulation/harness.cpp, amx_emulation/harness.cpp) share:
// the seeded generator, the failure counter with its CHECK macro (prints the first 20 failures),
// and random e4m3 payloads and scales.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "gemm_kernels.h"

namespace harness {

inline std::mt19937_64 rng;  // seeded by main from the test's fresh seed
inline int failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond) && harness::failures++ < 20) {            \
      std::printf("FAIL line %d: ", __LINE__);            \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

inline uint8_t random_byte(bool allow_nan) {
  for (;;) {
    const uint8_t v = static_cast<uint8_t>(rng() & 0xFF);
    if (allow_nan || !dsv3::gemm::is_e4m3_nan(v)) return v;
  }
}

inline std::vector<uint8_t> random_bytes(size_t n, bool allow_nan) {
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = random_byte(allow_nan);
  return v;
}

// A positive scale with a random mantissa, 2^lo_exp .. 2^(lo_exp + range).
inline float random_scale(int lo_exp, int range) {
  return std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, lo_exp + static_cast<int>(rng() % range));
}

// Seeds rng from the one argument (the test's fresh seed); false, after a usage line, without it.
inline bool seed_from_args(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SEED\n", argv[0]);
    return false;
  }
  rng.seed(std::strtoull(argv[1], nullptr, 10));
  return true;
}

// Prints the line the Python test looks for and returns the exit status (1 on any failure).
inline int report() {
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "all passed", failures);
  return failures ? 1 : 0;
}

}  // namespace harness
