// The blocking and threading of the AMX path (gemm_cpu.cpp's run_packed_amx): plain C++ over the
// AmxKernelSet of gemm_kernels.h, with the thread pool and the output passed in, so that
// tests/ops/amx_emulation/harness.cpp runs this same code under emulation on any x86-64 CPU.
//
//   1. A, every row decoded once to bf16 (rows padded to a multiple of kAmxMr with zeros),
//      one task per kAmxMr-row strip;
//   2. B, one slab of kAmxSlabN columns at a time (kAmxSlabN x K bf16, L3-sized), decoded into
//      VNNI panels (an even number: rows past N are zeros), one task per panel;
//   3. tasks of one A strip x kAmxTaskN columns of the slab: per kAmxMr x kAmxNr output tile, the
//      tile kernel runs every 128-K block (FP32 AMX tiles, promoted with the scales) into a
//      zeroed FP32 accumulator, which is then stored.
// Scales enter only at the promotion (sa[i, kb] * sb[j, kb] * kDecodeScale), never the operands.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "gemm_kernels.h"

namespace dsv3 {
namespace gemm {

constexpr int64_t kAmxSlabN = 512;                   // B columns decoded at a time (7168 x 512 bf16: 7 MB)
constexpr int64_t kAmxTaskN = 4 * kAmxNr;            // output columns per task
constexpr int64_t kAmxRowPad = kAmxK;                // +64 bytes per decoded row: no 4 KiB row strides
static_assert(kAmxSlabN % kAmxTaskN == 0 && kAmxTaskN % kAmxNr == 0, "tasks tile the slab");

// D = promote(A @ B^T) for A [m, k] (row i at a + i * lda) and B [n, k] (row j at b + j * ldb),
// e4m3 bytes, m, n, k > 0:
//   scale_a(i, kb), scale_b(j, kb): the scales of A row i and B row j for K block kb;
//   parallel(tasks, fn): runs fn(t) for every t in [0, tasks), in any order, on any threads;
//   store(i, j, v): receives each output's FP32 total once.
template <typename ScaleA, typename ScaleB, typename Parallel, typename Store>
void run_amx_gemm(const AmxKernelSet& ks, int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                  const uint8_t* b, int64_t ldb, const ScaleA& scale_a, const ScaleB& scale_b,
                  const Parallel& parallel, const Store& store) {
  const int64_t num_kb = (k + kBlockK - 1) / kBlockK, kp = (k + kAmxK - 1) / kAmxK * kAmxK;
  const int64_t ld16 = kp + kAmxRowPad, strips = (m + kAmxMr - 1) / kAmxMr;

  // The scales of every strip / column pair and K block: asc[(s * num_kb + kb) * kAmxMr + r],
  // bsc[(q * num_kb + kb) * kAmxNr + c] (zeros for padding rows and columns).
  const int64_t pairs = (n + kAmxNr - 1) / kAmxNr;
  std::vector<float> asc(static_cast<size_t>(strips * num_kb * kAmxMr));
  std::vector<float> bsc(static_cast<size_t>(pairs * num_kb * kAmxNr));
  for (int64_t s = 0; s < strips; ++s) pack_scales(s, m, num_kb, kAmxMr, asc.data(), scale_a);
  for (int64_t q = 0; q < pairs; ++q)
    pack_scales(q, n, num_kb, kAmxNr, bsc.data(), [&](int64_t j, int64_t kb) { return scale_b(j, kb) * kDecodeScale; });

  // Not zero-filled (every element read is written first): a serial memset of M x K bf16 would
  // cost a few percent of the GEMM.
  const std::unique_ptr<uint16_t[]> a16(new uint16_t[strips * kAmxMr * ld16]);
  parallel(strips, [&](int64_t s) {
    for (int64_t i = s * kAmxMr; i < (s + 1) * kAmxMr; ++i) {
      uint16_t* row = a16.get() + i * ld16;
      if (i < m)
        ks.decode_row(a + i * lda, k, row);
      else
        std::fill(row, row + kp, uint16_t{0});
    }
  });

  const int64_t panel = kp * kAmxPanelN;  // bf16 per B panel
  const std::unique_ptr<uint16_t[]> slab(new uint16_t[std::min(pairs * kAmxNr, kAmxSlabN) / kAmxPanelN * panel]);
  for (int64_t s0 = 0; s0 < n; s0 += kAmxSlabN) {
    const int64_t sn = std::min(kAmxSlabN, n - s0), sq = (sn + kAmxNr - 1) / kAmxNr;  // column pairs
    parallel(2 * sq, [&](int64_t p) {
      const int64_t j = s0 + p * kAmxPanelN;
      const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kAmxPanelN, n - j)));
      ks.pack_b(b + std::min(j, n - 1) * ldb, ldb, rows, k, slab.get() + p * panel);
    });
    const int64_t tasks_n = (sn + kAmxTaskN - 1) / kAmxTaskN;
    parallel(strips * tasks_n, [&](int64_t t) {
      const int64_t s = t / tasks_n, q0 = (t % tasks_n) * (kAmxTaskN / kAmxNr);
      float acc[kAmxMr * kAmxNr];
      for (int64_t q = q0; q < std::min(sq, q0 + kAmxTaskN / kAmxNr); ++q) {
        std::fill(acc, acc + kAmxMr * kAmxNr, 0.0f);
        ks.tile(a16.get() + s * kAmxMr * ld16, ld16, slab.get() + 2 * q * panel, panel, k,
                asc.data() + s * num_kb * kAmxMr, bsc.data() + (s0 / kAmxNr + q) * num_kb * kAmxNr, acc, kAmxNr);
        const int64_t j0 = s0 + q * kAmxNr;
        for (int64_t i = s * kAmxMr; i < std::min(m, (s + 1) * kAmxMr); ++i)
          for (int64_t j = j0; j < std::min(n, j0 + kAmxNr); ++j) store(i, j, acc[(i - s * kAmxMr) * kAmxNr + j - j0]);
      }
    });
  }
}

}  // namespace gemm
}  // namespace dsv3
