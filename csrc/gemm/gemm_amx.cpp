// AMX-BF16 kernels of the CPU FP8 GEMM's compute-bound (packed) path (gemm_kernels.h's
// AmxKernelSet; gemm_cpu.cpp's run_packed_amx drives them). e4m3 -> bf16 is exact, so A rows and
// B panels are decoded to bf16 (value / 256, the number format of the other kernel sets) and
// multiplied with TDPBF16PS: a 32 x 32 output tile is four 16 x 16 FP32 tiles (tmm0-3) fed by two
// A tiles (tmm4-5: 16 rows x 32 K) and two B tiles (tmm6-7: 16 K pairs x 16 columns), zeroed at
// each 128-K block, stored and promoted into the FP32 C accumulator with sa[m, kb] * sb[n, kb]
// (DeepSeek-V3's scheme: the scales are never folded into the bf16 operands).
//
// Numbers: every bf16 operand is an exact e4m3 value / 256, so every product is exact in FP32 and
// never subnormal (|product| >= 2^-34): the denormal flushing that Intel documents for TDPBF16PS
// never changes a result here. A NaN byte decodes to a bf16 NaN and turns its row (A) or column
// (B) of the tile into NaN through the FP32 arithmetic, as in the other paths.
//
// As in gemm_avx512.cpp, the target pragma comes after every library #include, so no header code
// is compiled for AMX / AVX-512; gemm_cpu.cpp calls these only when active_cpu_isa() reaches
// kAmx, which needs an explicit opt-in (DSV3_CPU_ISA=amx or ops.set_cpu_isa("amx")) until they
// have run on such a CPU (kHighestVerifiedIsa in common/cpu_features.cpp). The OS's permission
// for tile data is requested once by cpu_features.cpp's detection. Written and compiled on an
// AVX2-only machine; tests/ops/test_gemm_amx_emulated.py checks the logic with every intrinsic
// emulated (SIMDe + tests/ops/amx_emulation/immintrin.h).

// GCC 12's AVX-512 intrinsics initialise their "undefined" vectors from themselves, which
// -Wuninitialized flags once they are inlined (GCC bug 105593, fixed in GCC 13): silenced for
// the intrinsics header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>

#include "gemm_kernels.h"

#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "gemm_avx512_inline.h"  // after the pragma: its helpers are compiled for this target

namespace dsv3 {
namespace gemm {
namespace {

static_assert(kAmxK == 32 && kAmxPanelN == 16 && kAmxMr == 32 && kAmxNr == 32,
              "gemm_amx.cpp is written for 32 x 32 output tiles of 16 x 16 FP32 AMX tiles");

// ldtilecfg's 64-byte operand, palette 1: tiles 0..7 all 16 rows x 64 bytes (16 fp32 outputs,
// 32 bf16 of A, or 16 bf16 pairs of B per row). A constant in read-only memory: GCC 12's
// _tile_loadconfig tells the compiler it reads only 8 bytes, so a local copy's other stores
// could be optimised away.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of tile t
  uint8_t rows[16];    // rows of tile t
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");
constexpr TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// Indices for vpermt2w: the high 16 bits of each 32-bit element of two vectors, in order (an
// fp32 whose low 16 bits are zero, as every decoded e4m3 value is, is exactly that bf16).
alignas(64) constexpr uint16_t kHighHalves[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                  23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                  45, 47, 49, 51, 53, 55, 57, 59, 61, 63};

// The 32 bytes at src (only the first n read; zeros past n, n may be <= 0) -> 32 bf16 equal to
// e4m3 / 256, exact, NaN kept.
inline __m512i e4m3x32_to_bf16(const uint8_t* src, int64_t n) {
  const __m512 lo = e4m3x16_to_f32(_mm_maskz_loadu_epi8(low_lanes16(n), src));
  const __m512 hi = e4m3x16_to_f32(_mm_maskz_loadu_epi8(low_lanes16(n - 16), src + 16));
  const __m512i idx = _mm512_load_si512(kHighHalves);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), idx, _mm512_castps_si512(hi));
}

void decode_row_amx(const uint8_t* src, int64_t k, uint16_t* dst) {
  for (int64_t kk = 0; kk < k; kk += kAmxK) _mm512_storeu_si512(dst + kk, e4m3x32_to_bf16(src + kk, k - kk));
}

// 16 rows x 32 K columns at a time: each row decodes to 16 32-bit K pairs, and a 16 x 16
// transpose of those pairs gives 16 rows of the VNNI layout (K pair p: 16 columns x 2 bf16).
void pack_b_amx(const uint8_t* src, int64_t ld, int rows, int64_t k, uint16_t* dst) {
  for (int64_t kk = 0; kk < k; kk += kAmxK) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      r[i] = i < rows ? _mm512_castsi512_ps(e4m3x32_to_bf16(src + i * ld + kk, k - kk)) : _mm512_setzero_ps();
    transpose16(r);
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) _mm512_storeu_ps(dst + (kk / 2 + p) * 2 * kAmxPanelN, r[p]);
  }
}

void tile_amx(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t k, const float* asc,
              const float* bsc, float* c, int64_t ldc) {
  constexpr int64_t kPartLd = kAmxNr;  // the stored FP32 block partial: 32 x 32, row-major
  alignas(64) float part[kAmxMr * kPartLd];
  const int64_t a_stride = lda * static_cast<int64_t>(sizeof(uint16_t));
  constexpr int64_t kBStride = 2 * kAmxPanelN * sizeof(uint16_t);  // a VNNI row: 64 bytes
  _tile_loadconfig(&kTileConfig);
  for (int64_t b0 = 0, kb = 0; b0 < k; b0 += kBlockK, ++kb) {
    const int64_t b1 = std::min(k, b0 + kBlockK);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kk = b0; kk < b1; kk += kAmxK) {  // a last partial step reads the zero padding
      _tile_loadd(4, a + kk, a_stride);
      _tile_loadd(5, a + 16 * lda + kk, a_stride);
      _tile_loadd(6, b + kk * kAmxPanelN, kBStride);  // K pair kk / 2 starts at (kk / 2) * 32
      _tile_loadd(7, b + ldb + kk * kAmxPanelN, kBStride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, part, kPartLd * sizeof(float));
    _tile_stored(1, part + 16, kPartLd * sizeof(float));
    _tile_stored(2, part + 16 * kPartLd, kPartLd * sizeof(float));
    _tile_stored(3, part + 16 * kPartLd + 16, kPartLd * sizeof(float));
    const __m512 bs0 = _mm512_loadu_ps(bsc + kb * kAmxNr), bs1 = _mm512_loadu_ps(bsc + kb * kAmxNr + 16);
    for (int i = 0; i < kAmxMr; ++i) {
      const float s_a = asc[kb * kAmxMr + i];
      promote16(c + i * ldc, _mm512_load_ps(part + i * kPartLd), s_a, bs0);
      promote16(c + i * ldc + 16, _mm512_load_ps(part + i * kPartLd + 16), s_a, bs1);
    }
  }
  _tile_release();
}

}  // namespace

AmxKernelSet amx_kernels() { return {&decode_row_amx, &pack_b_amx, &tile_amx}; }

}  // namespace gemm
}  // namespace dsv3
