// E4M3 (float8_e4m3fn) conversion shared by the CPU and CUDA kernels.
//
// One definition on both devices is what makes the CPU and CUDA casts bit-identical: the
// conversion is exact round-to-nearest-even done with integer arithmetic, never a
// hardware converter whose NaN or saturation rules could differ.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DSV3_HD __host__ __device__ __forceinline__
#else
#define DSV3_HD inline
#endif

namespace dsv3 {

constexpr float kE4M3Max = 448.0f;
constexpr float kMinAmax = 1e-4f;  // DeepSeek-V3 report, section 3.3: amax clamped to 1e-4
constexpr uint8_t kE4M3NaN = 0x7F;

DSV3_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

DSV3_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

// Rounds a positive normal float up to the next power of two (UE8M0 scales); powers of two,
// NaN and Inf are returned unchanged.
DSV3_HD float round_up_pow2(float v) {
  uint32_t b = float_bits(v);
  if ((b & 0x7F800000u) == 0x7F800000u) return v;
  if (b & 0x007FFFFFu) b = (b & 0xFF800000u) + 0x00800000u;
  return bits_float(b);
}

// The scale of a tile: fp32(max(amax, 1e-4)) / 448 with IEEE division. NaN in the tile
// (amax NaN) gives a NaN scale, Inf gives an Inf scale: the tile then dequantizes to NaN.
DSV3_HD float scale_from_amax(float amax, bool use_ue8m0) {
  float m = (amax != amax) ? amax : (amax < kMinAmax ? kMinAmax : amax);
#if defined(__CUDA_ARCH__)
  float sf = __fdiv_rn(m, kE4M3Max);
#else
  float sf = m / kE4M3Max;
#endif
  return use_ue8m0 ? round_up_pow2(sf) : sf;
}

// fp32 -> e4m3fn with round-to-nearest-even; |v| is clamped to 448 first; NaN -> 0x7F.
DSV3_HD uint8_t float_to_e4m3(float v) {
  uint32_t bits = float_bits(v);
  uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  uint32_t abits = bits & 0x7FFFFFFFu;
  if (abits > 0x7F800000u) return kE4M3NaN;
  if (abits >= 0x43E00000u) return sign | 0x7E;  // >= 448 (Inf included) saturates
  if (abits < 0x3C800000u) {                      // below 2^-6: subnormal, quantum 2^-9
    float scaled = bits_float(abits) * 512.0f;    // exact: multiply by a power of two
#if defined(__CUDA_ARCH__)
    int q = __float2int_rn(scaled);
#else
    // round half to even without depending on the FPU rounding mode
    int q = static_cast<int>(scaled);
    float frac = scaled - static_cast<float>(q);
    if (frac > 0.5f || (frac == 0.5f && (q & 1))) ++q;
#endif
    return sign | static_cast<uint8_t>(q);  // q == 8 is the smallest normal, 0x08
  }
  uint32_t lsb = (abits >> 20) & 1u;
  abits += 0x0007FFFFu + lsb;  // round the 23-bit mantissa to 3 bits, ties to even
  uint32_t exp = (abits >> 23) - 127u + 7u;
  uint32_t mant = (abits >> 20) & 7u;
  return sign | static_cast<uint8_t>((exp << 3) | mant);
}

// Quantizes one value given its tile's scale: e4m3(RNE(x / sf)) with IEEE division.
DSV3_HD uint8_t quantize_value(float x, float sf) {
#if defined(__CUDA_ARCH__)
  return float_to_e4m3(__fdiv_rn(x, sf));
#else
  return float_to_e4m3(x / sf);
#endif
}

}  // namespace dsv3
