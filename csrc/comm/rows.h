// Row kernels of the dispatch/combine on the CPU, each with a portable and an AVX2 version
// (rows_avx2.cpp), picked at run time with active_cpu_isa() by pack_cpu.cpp.
//
// copy_row: the pack's copy of one payload row into the send buffer. The AVX2 version writes
// with non-temporal (streaming) stores: the send buffer is tens of MB, read next by the backend
// (a socket write on gloo), never by this core's cache, so skipping the read-for-ownership of
// each destination line halves the memory traffic (measured: 15000 rows of 4 KiB, 20 -> 10 ms).
// The caller ends a streamed section with copy_rows_done() (a store fence).
//
// sum_rows: the combine's per-token sum: out = sum of n rows (in the order given), accumulated in
// at::opmath_type<T> (FP32 for float32/bfloat16/float16, FP64 for float64), rounded once to T.
// A portable version for every dtype and an AVX2 one for the three FP32-
// accumulated dtypes, bit-identical to the portable one (same order of additions, same rounding
// as c10's conversions) except for which NaN a sum of two NaNs keeps (payload and sign: the
// compiler may swap the operands of an addition). pack_cpu.cpp picks one at run time.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dsv3 {

template <typename T>
void sum_rows_portable(const T* const* rows, int64_t n, int64_t h, T* out) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t kChunk = 256;  // columns per pass: the accumulators stay in L1, loops vectorise
  acc_t acc[kChunk];
  for (int64_t c0 = 0; c0 < h; c0 += kChunk) {
    const int64_t w = std::min(kChunk, h - c0);
    for (int64_t c = 0; c < w; ++c) acc[c] = static_cast<acc_t>(rows[0][c0 + c]);
    for (int64_t i = 1; i < n; ++i)
      for (int64_t c = 0; c < w; ++c) acc[c] += static_cast<acc_t>(rows[i][c0 + c]);
    for (int64_t c = 0; c < w; ++c) out[c0 + c] = static_cast<T>(acc[c]);
  }
}

// AVX2 + F16C (rows_avx2.cpp); only called when the CPU has them. T: float, BFloat16, Half.
template <typename T>
void sum_rows_avx2(const T* const* rows, int64_t n, int64_t h, T* out);

inline void copy_row_portable(uint8_t* dst, const uint8_t* src, int64_t bytes) { std::memcpy(dst, src, bytes); }
void copy_row_avx2(uint8_t* dst, const uint8_t* src, int64_t bytes);
void copy_rows_done_avx2();  // store fence after streamed copies

}  // namespace dsv3
