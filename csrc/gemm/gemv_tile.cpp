// run_gemv_tile (gemm_kernels.h): the GemvFn of the vector kernel sets, compiled for the
// baseline ISA so that both sets (gemm_avx2.cpp, gemm_avx512.cpp) can share it.
#include <xmmintrin.h>

#include "gemm_kernels.h"

namespace dsv3 {
namespace gemm {

void run_gemv_tile(const GemvTileFn (&tiles)[kGemvMr], const float* a, int64_t lda, const float* sa, int64_t ldsa,
                   int mr, const uint8_t* const* b, const float* const* sb, int64_t k, float* out, int64_t ldo) {
  const unsigned csr = _mm_getcsr();
  constexpr unsigned kDaz = 0x40;  // MXCSR's denormals-are-zero bit
  if (csr & kDaz) _mm_setcsr(csr & ~kDaz);
  tiles[mr - 1](a, lda, sa, ldsa, b, sb, k, out, ldo);
  if (csr & kDaz) _mm_setcsr(csr);
}

}  // namespace gemm
}  // namespace dsv3
