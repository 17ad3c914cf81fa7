// FP8 casts on CUDA: the same arithmetic as cast_cpu.cpp (fp8.h), so both devices give
// bit-identical payloads and scales. Simple kernels, written to be certainly correct first:
// one thread block per tile, a block-wide amax, then the tile's quantization.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../common/fp8.h"

namespace dsv3 {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float nan_max_dev(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Block-wide NaN-propagating max; every thread gets the result.
__device__ float block_amax(float v) {
  __shared__ float partial[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v = nan_max_dev(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float m = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) m = nan_max_dev(m, partial[w]);
  __syncthreads();
  return m;
}

template <typename T>
__global__ void cast_tiles_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, float* __restrict__ scales,
                                  int64_t m, int64_t k, int tile_rows, int tile_cols, int64_t tiles_k,
                                  bool use_ue8m0) {
  const int64_t t = blockIdx.x;
  const int64_t r0 = (t / tiles_k) * tile_rows, c0 = (t % tiles_k) * tile_cols;
  const int rows = static_cast<int>(min64(tile_rows, m - r0));
  const int cols = static_cast<int>(min64(tile_cols, k - c0));
  const int n = rows * cols;
  float amax = 0.0f;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    float v = fabsf(static_cast<float>(x[(r0 + i / cols) * k + c0 + i % cols]));
    amax = nan_max_dev(amax, v);
  }
  const float sf = scale_from_amax(block_amax(amax), use_ue8m0);
  if (threadIdx.x == 0) scales[t] = sf;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int64_t idx = (r0 + i / cols) * k + c0 + i % cols;
    out[idx] = quantize_value(static_cast<float>(x[idx]), sf);
  }
}

// x [M, K] -> out [K, M] in 1 x group tiles along M; one block per (group of rows, 32 channels).
template <typename T>
__global__ void cast_transposed_kernel(const T* __restrict__ x, uint8_t* __restrict__ out,
                                       float* __restrict__ scales, int64_t m, int64_t k, int group,
                                       int64_t groups_m, bool use_ue8m0) {
  __shared__ float col_amax[kThreads / 32][32];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t g = blockIdx.y, r0 = g * group, c = blockIdx.x * 32 + tx;
  const int64_t r_end = min64(r0 + group, m);
  float amax = 0.0f;
  if (c < k)
    for (int64_t r = r0 + ty; r < r_end; r += kThreads / 32) amax = nan_max_dev(amax, fabsf(static_cast<float>(x[r * k + c])));
  col_amax[ty][tx] = amax;
  __syncthreads();
  float col = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) col = nan_max_dev(col, col_amax[w][tx]);
  const float sf = scale_from_amax(col, use_ue8m0);
  if (c >= k) return;
  if (ty == 0) scales[c * groups_m + g] = sf;
  for (int64_t r = r0 + ty; r < r_end; r += kThreads / 32) out[c * m + r] = quantize_value(static_cast<float>(x[r * k + c]), sf);
}

void check_launch() {
  cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> cast_to_fp8_tiles_cuda(const at::Tensor& x, int64_t tile_rows,
                                                          int64_t tile_cols, bool use_ue8m0) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "cast_to_fp8_tiles: x must be 2-D and contiguous");
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0, "cast_to_fp8_tiles: tile sizes must be positive");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t tiles_m = (m + tile_rows - 1) / tile_rows, tiles_k = (k + tile_cols - 1) / tile_cols;
  auto out = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({tiles_m, tiles_k}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, scales};
  auto stream = at::cuda::getCurrentCUDAStream();
  DSV3_DISPATCH_FLOAT_INPUTS(x.scalar_type(), "cast_to_fp8_tiles", [&] {
    cast_tiles_kernel<scalar_t><<<tiles_m * tiles_k, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), reinterpret_cast<uint8_t*>(out.data_ptr()), scales.data_ptr<float>(), m, k,
        static_cast<int>(tile_rows), static_cast<int>(tile_cols), tiles_k, use_ue8m0);
  });
  check_launch();
  return {out, scales};
}

std::tuple<at::Tensor, at::Tensor> cast_to_fp8_transposed_cuda(const at::Tensor& x, int64_t group,
                                                               bool use_ue8m0) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "cast_to_fp8_transposed: x must be 2-D and contiguous");
  TORCH_CHECK(group > 0, "cast_to_fp8_transposed: group_size must be positive");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t groups_m = (m + group - 1) / group;
  auto out = at::empty({k, m}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({k, groups_m}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, scales};
  auto stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(groups_m < 65536, "cast_to_fp8_transposed: too many token groups for one launch");
  dim3 grid(static_cast<unsigned>((k + 31) / 32), static_cast<unsigned>(groups_m));
  DSV3_DISPATCH_FLOAT_INPUTS(x.scalar_type(), "cast_to_fp8_transposed", [&] {
    cast_transposed_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), reinterpret_cast<uint8_t*>(out.data_ptr()), scales.data_ptr<float>(), m, k,
        static_cast<int>(group), groups_m, use_ue8m0);
  });
  check_launch();
  return {out, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) {
  m.impl("cast_to_fp8_tiles", &cast_to_fp8_tiles_cuda);
  m.impl("cast_to_fp8_transposed", &cast_to_fp8_transposed_cuda);
}

}  // namespace dsv3
