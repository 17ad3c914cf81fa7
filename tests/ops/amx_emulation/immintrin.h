// Stands in for <immintrin.h> when tests/ops/test_gemm_amx_emulated.py compiles
// csrc/gemm/gemm_amx.cpp (its target pragma removed) for a CPU without AMX: the AVX-512
// intrinsics come from the AVX-512 stand-in (SIMDe plus the few it lacks), and the AMX ones used
// by gemm_amx.cpp are written here from Intel's definitions (Intel SDM, Vol. 2: LDTILECFG,
// TILEZERO, TILELOADD, TILESTORED, TDPBF16PS, TILERELEASE): a per-thread register file of 8
// tiles of up to 16 rows x 64 bytes and a per-thread configuration.
//
// TDPBF16PS follows the SDM's pseudo-code: for each row m, K pair k and column n, in that
// order, tmp[n] += fp32(A[m][2k]) * fp32(B[k][2n]), then tmp[n] += fp32(A[m][2k+1]) *
// fp32(B[k][2n+1]), each an FP32 operation rounded to nearest even, with the SDM's
// denormals-are-zero on the bf16 inputs and flush-to-zero of FP32 results. Real hardware may
// differ in the last bits of a sum (the SDM does not pin down its internal fusing); gemm_amx.cpp
// never meets a denormal (its operands are e4m3 values / 256). Misuse that the hardware would
// fault on (a tile used before LDTILECFG on this thread, shapes that do not match, palette other
// than 1), and a thread that ends with its tiles still configured, abort with a message.
#pragma once
#include "../avx512_emulation/immintrin.h"

#include <cstdio>
#include <cstdlib>

namespace emu_amx {

struct Tile {
  int rows = 0, colsb = 0;
  uint8_t bytes[16][64] = {};
};

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "AMX emulation: %s\n", what);
  std::abort();
}

struct State {
  bool configured = false;
  Tile tiles[8];
  // Not a hardware fault but gemm_amx.cpp's contract: every kernel call releases its tiles
  // (TILERELEASE), so no thread keeps the AMX state live (saved on each context switch).
  ~State() {
    if (configured) fault("a thread ended with its tiles configured (no TILERELEASE)");
  }
};

inline State& state() {
  thread_local State s;
  return s;
}

inline Tile& tile(int t) {
  if (t < 0 || t > 7) fault("tile number out of range");
  if (!state().configured) fault("tile instruction before LDTILECFG on this thread");
  return state().tiles[t];
}

// LDTILECFG: byte 0 palette (1: 8 tiles of up to 16 rows x 64 bytes), byte 1 start_row,
// bytes 2..15 reserved (zero), bytes 16 + 2t: colsb of tile t (uint16), byte 48 + t: rows of
// tile t. Tiles 8..15 do not exist in palette 1 and must be zero. All tiles are zeroed.
inline void loadconfig(const void* config) {
  uint8_t c[64];
  std::memcpy(c, config, 64);
  if (c[0] != 1) fault("LDTILECFG: palette must be 1");
  for (int i = 1; i < 16; ++i)
    if (c[i] != 0) fault("LDTILECFG: start_row and reserved bytes must be zero");
  State& s = state();
  for (int t = 0; t < 16; ++t) {
    const int colsb = c[16 + 2 * t] | (c[17 + 2 * t] << 8), rows = c[48 + t];
    if (t >= 8) {
      if (colsb != 0 || rows != 0) fault("LDTILECFG: palette 1 has 8 tiles");
      continue;
    }
    if (colsb > 64 || rows > 16 || colsb % 4 != 0 || (rows == 0) != (colsb == 0)) fault("LDTILECFG: bad tile shape");
    s.tiles[t] = Tile{};
    s.tiles[t].rows = rows, s.tiles[t].colsb = colsb;
  }
  s.configured = true;
}

inline void release() { state() = State{}; }

inline void zero(int t) {
  Tile& x = tile(t);
  std::memset(x.bytes, 0, sizeof(x.bytes));
}

// TILELOADD: rows of colsb bytes, row r at base + r * stride; the rest of the register zeroed.
inline void loadd(int t, const void* base, long stride) {
  Tile& x = tile(t);
  std::memset(x.bytes, 0, sizeof(x.bytes));
  for (int r = 0; r < x.rows; ++r) std::memcpy(x.bytes[r], static_cast<const char*>(base) + r * stride, x.colsb);
}

inline void stored(int t, void* base, long stride) {
  Tile& x = tile(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(static_cast<char*>(base) + r * stride, x.bytes[r], x.colsb);
}

// bf16 -> fp32 with denormals read as (signed) zero.
inline float bf16_daz(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  if ((h & 0x7F80) == 0) h &= 0x8000;
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float ftz(float f) { return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.0f, f) : f; }

inline void dpbf16ps(int dst, int src1, int src2) {
  Tile &c = tile(dst), &a = tile(src1), &b = tile(src2);
  if (a.colsb / 4 != b.rows || c.colsb != b.colsb || c.rows != a.rows) fault("TDPBF16PS: tile shapes do not match");
  for (int m = 0; m < c.rows; ++m) {
    float tmp[16];
    std::memcpy(tmp, c.bytes[m], c.colsb);
    for (int k = 0; k < a.colsb / 4; ++k)
      for (int n = 0; n < c.colsb / 4; ++n) {
        tmp[n] = ftz(tmp[n] + bf16_daz(&a.bytes[m][4 * k]) * bf16_daz(&b.bytes[k][4 * n]));
        tmp[n] = ftz(tmp[n] + bf16_daz(&a.bytes[m][4 * k + 2]) * bf16_daz(&b.bytes[k][4 * n + 2]));
      }
    std::memcpy(c.bytes[m], tmp, c.colsb);
  }
}

}  // namespace emu_amx

#define _tile_loadconfig(config) emu_amx::loadconfig(config)
#define _tile_release() emu_amx::release()
#define _tile_zero(t) emu_amx::zero(t)
#define _tile_loadd(t, base, stride) emu_amx::loadd((t), (base), (stride))
#define _tile_stored(t, base, stride) emu_amx::stored((t), (base), (stride))
#define _tile_dpbf16ps(dst, src1, src2) emu_amx::dpbf16ps((dst), (src1), (src2))
