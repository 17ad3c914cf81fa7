// Building blocks of the CPU FP8 GEMM (gemm_cpu.cpp drives them), each in a portable
// (gemm_portable.cpp), an AVX2 (gemm_avx2.cpp) and an AVX-512 (gemm_avx512.cpp) version, all in
// the packed layouts and number formats below (panels decoded by one set work with any other):
//   * convert: an e4m3 -> fp32 row decoder (exact, NaN kept), used to pack operands;
//   * pack_b:  decodes rows of B straight into K-interleaved kNr-column panels;
//   * micro:   a register-blocked kMr x kNr FP32 micro-kernel (A rows x a B panel) that walks every
//              128-K block of its K range itself and promotes each block's FP32 partial into an
//              FP32 C tile with sa[m, kb] * sb[n, kb] (DeepSeek-V3's promotion; scales are never
//              folded into the operands);
//   * gemv_pack_a + gemv: the memory-bound path (few rows of A): A is packed once per call in
//              the kernel set's own layout; gemv streams FP8 rows of B, decodes each vector
//              once in registers and FMAs it into up to kGemvMr rows of A.
//
// Number format inside convert / pack_b / micro: payload bytes are decoded to fp32 value / 256
// (exact: a power-of-two shift of an e4m3 value, never subnormal in fp32), because the decoder
// moves the e4m3 bits into fp16 bits and converts with vcvtph2ps, which divides by 2^8 for free.
// The promotion scales carry the two factors of 256 back (kDecodeScale), so nothing is lost.
// gemv has its own exact power-of-two factors (see gemv_pack_a in each implementation).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace dsv3 {
namespace gemm {

constexpr int64_t kBlockK = 128;  // K elements per scale tile / promotion interval
constexpr float kDecodeFactor = 256.0f;
constexpr float kDecodeScale = kDecodeFactor * kDecodeFactor;  // multiplies every promotion scale

// Packed micro-kernel tile: kMr rows of A (broadcast) x kNr columns of B (two AVX2 vectors):
// 12 FP32 accumulators.
constexpr int kMr = 6;
constexpr int kNr = 16;

// GEMV tile: up to kGemvMr rows of A against kGemvRows rows of B at a time.
constexpr int kGemvMr = 4;
constexpr int kGemvRows = 3;
constexpr int64_t kGemvAlign = 32;  // gemv_pack_a writes A rows zero padded to a multiple of this

// The exact value of an e4m3fn byte divided by 256 (NaN for 0x7F and 0xFF).
inline float e4m3_to_float_div256(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const float f = e == 0 ? std::ldexp(static_cast<float>(m), -9 - 8) : std::ldexp(static_cast<float>(8 + m), e - 10 - 8);
  return (v & 0x80) ? -f : f;
}

inline bool is_e4m3_nan(uint8_t v) { return (v & 0x7F) == 0x7F; }

// Writes dst[i] = e4m3(src[i]) / 256 for i < n.
using ConvertFn = void (*)(const uint8_t* src, int64_t n, float* dst);

// Decodes columns [k0, k0 + len) of `rows` <= kNr rows of an FP8 matrix (row r at
// src + r * ld) into one K-interleaved panel chunk: dst[kk * kNr + r] = e4m3(src[r][k0 + kk]) / 256,
// zeros for r >= rows.
using PackFn = void (*)(const uint8_t* src, int64_t ld, int rows, int64_t k0, int64_t len, float* dst);

// One kMr x kNr tile over K columns [k0, k1) (k0 a multiple of kBlockK):
//   ap: decoded A rows at column k0, element (i, k) at ap[i * lda + (k - k0)];
//   bp: the B panel at column k0, element (k, j) at bp[(k - k0) * kNr + j];
//   asc[kb * kMr + i], bsc[kb * kNr + j]: the tile's scales per K block (bsc includes
//   kDecodeScale);
//   c[i * ldc + j] += sum_kb (sum_{k in block kb} a(i, k) * b(k, j)) * (asc[kb, i] * bsc[kb, j]),
//   the inner sum in FP32 registers, promoted once per block.
using MicroFn = void (*)(const float* ap, int64_t lda, const float* bp, int64_t k0, int64_t k1, const float* asc,
                         const float* bsc, float* c, int64_t ldc);

// Packs one FP8 row of A (k bytes) for gemv: writes round_up(k, kGemvAlign) floats (zeros past
// k) in the layout and number format that this kernel set's gemv reads.
using GemvPackAFn = void (*)(const uint8_t* src, int64_t k, float* dst);

// GEMV tile: out[i * ldo + r] = sum_kb promote(A row i . B row r) for i < mr <= kGemvMr and
// r < kGemvRows, over K columns:
//   a: A rows packed by gemv_pack_a, row i at a + i * lda; sa[i * ldsa + kb]: A scales;
//   b[r]: FP8 row r of B (K bytes); sb[r][kb]: its scales;
//   the promotion multiplies each block's FP32 partial by sa * sb. A NaN byte in B row r makes
//   column r NaN (as IEEE arithmetic would).
using GemvFn = void (*)(const float* a, int64_t lda, const float* sa, int64_t ldsa, int mr, const uint8_t* const* b,
                        const float* const* sb, int64_t k, float* out, int64_t ldo);

// A vector kernel set's GEMV tile for a fixed count of A rows: GemvFn without mr.
using GemvTileFn = void (*)(const float* a, int64_t lda, const float* sa, int64_t ldsa, const uint8_t* const* b,
                            const float* const* sb, int64_t k, float* out, int64_t ldo);

// The vector sets' GemvFn: runs tiles[mr - 1] (tiles for 1..kGemvMr rows) with the FPU's
// denormals-are-zero mode off for the call, since their GEMVs decode e4m3 subnormals to fp32
// subnormals, which DAZ (set by some libraries) would read as zero. In gemm_cpu.cpp, compiled
// for the baseline ISA.
void run_gemv_tile(const GemvTileFn (&tiles)[kGemvMr], const float* a, int64_t lda, const float* sa, int64_t ldsa,
                   int mr, const uint8_t* const* b, const float* const* sb, int64_t k, float* out, int64_t ldo);

// The scales of every K block of a panel of `pr` rows: scales[(p * num_kb + kb) * pr + r] =
// scale_of(p * pr + r, kb), 0 for rows past `rows`: the asc / bsc layout micro (pr = kMr, kNr)
// and the AMX tile (kAmxMr, kAmxNr) read. Driver code (gemm_cpu.cpp, gemm_amx_driver.h), never
// instantiated in a kernel file, so it is only compiled for the baseline ISA.
template <typename ScaleOf>
void pack_scales(int64_t p, int64_t rows, int64_t num_kb, int pr, float* scales, ScaleOf scale_of) {
  for (int64_t kb = 0; kb < num_kb; ++kb)
    for (int r = 0; r < pr; ++r) {
      const int64_t row = p * pr + r;
      scales[(p * num_kb + kb) * pr + r] = row < rows ? scale_of(row, kb) : 0.0f;
    }
}

struct KernelSet {
  ConvertFn convert;
  PackFn pack_b;
  MicroFn micro;
  GemvPackAFn gemv_pack_a;
  GemvFn gemv;
};

KernelSet portable_kernels();  // gemm_portable.cpp
KernelSet avx2_kernels();      // gemm_avx2.cpp; call only when the CPU has AVX2, FMA and F16C
// gemm_avx512.cpp; call only when the CPU has AVX-512 F/BW/VL/DQ (CpuIsa::kAvx512 or above). Not
// yet run on such a CPU: active_cpu_isa() reaches it only on an explicit opt-in (cpu_features.cpp).
KernelSet avx512_kernels();

// ---- The AMX-BF16 path (gemm_amx.cpp; CpuIsa::kAmx) for the packed GEMM ----
// e4m3 -> bf16 is exact (3 mantissa bits; bf16 has fp32's exponent range), so A and B are decoded
// to bf16 in the number format above (value / 256) and multiplied by TDPBF16PS into FP32 tiles,
// zeroed per 128-K block and promoted into an FP32 C accumulator with sa[m, kb] * sb[n, kb]
// (bsc including kDecodeScale, as for micro). K is zero padded to a multiple of kAmxK: zero bytes
// decode to +0, so the padding adds nothing.
constexpr int64_t kAmxK = 32;  // K per tile step: a tile row is 32 bf16 = 64 bytes
constexpr int kAmxPanelN = 16;  // columns of a B panel (a tile's 16 fp32 outputs per row)
constexpr int kAmxMr = 32;      // rows of A per amx tile call (two 16-row tiles)
constexpr int kAmxNr = 2 * kAmxPanelN;  // columns per amx tile call (two B panels)

// Writes one FP8 row of A (k bytes) as round_up(k, kAmxK) bf16 bit patterns: e4m3(src[kk]) / 256
// (NaN kept), zeros past k.
using AmxDecodeRowFn = void (*)(const uint8_t* src, int64_t k, uint16_t* dst);
// Decodes `rows` <= kAmxPanelN rows of B (row r at src + r * ld, k bytes) into one panel in
// TDPBF16PS's B layout (K pairs interleaved, "VNNI"): for kk < round_up(k, kAmxK),
// dst[(kk / 2) * 2 * kAmxPanelN + 2 * r + kk % 2] = e4m3(src[r][kk]) / 256 as bf16, zeros for
// kk >= k and r >= rows. (A 16-row tile of it is 16 K pairs x 16 columns, 64 bytes a row.)
using AmxPackBFn = void (*)(const uint8_t* src, int64_t ld, int rows, int64_t k, uint16_t* dst);
// One kAmxMr x kAmxNr tile over all of K:
//   a: bf16 rows of A from amx decode_row, row i at a + i * lda (i < kAmxMr);
//   b: two B panels from amx pack_b, at b and b + ldb;
//   asc[kb * kAmxMr + i], bsc[kb * kAmxNr + j]: the scales per K block (bsc includes
//   kDecodeScale);
//   c[i * ldc + j] += sum_kb (sum_{k in block kb} a(i, k) * b(k, j)) * (asc[kb, i] * bsc[kb, j]),
//   the inner sum in FP32 AMX tiles, promoted once per block.
// Loads its tile configuration and releases the tiles itself: any thread may call it.
using AmxTileFn = void (*)(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t k,
                           const float* asc, const float* bsc, float* c, int64_t ldc);

struct AmxKernelSet {
  AmxDecodeRowFn decode_row;
  AmxPackBFn pack_b;
  AmxTileFn tile;
};

// gemm_amx.cpp; call only when active_cpu_isa() >= CpuIsa::kAmx (AMX-TILE, AMX-BF16, AVX-512 and
// the OS's permission for tile data). Not yet run on such a CPU: reached only on an explicit
// opt-in (cpu_features.cpp).
AmxKernelSet amx_kernels();

}  // namespace gemm
}  // namespace dsv3
