// FP8 casts on the CPU: schemas of the cast ops and their CPU kernels.
//
// Inputs arrive checked and contiguous from ops/quant.py. A tile is tile_rows x tile_cols
// elements of a row-major [M, K] matrix (1 x 128 for activations, 128 x 128 for weights);
// ragged edge tiles are quantized on their own amax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/cpu_features.h"
#include "../common/dispatch.h"
#include "cast_kernels.h"

namespace dsv3 {
namespace {

template <typename T>
struct SegmentOps {
  float (*amax)(const T*, int64_t);
  void (*quantize)(const T*, int64_t, float, uint8_t*);
};

template <typename T>
SegmentOps<T> segment_ops() {
  if (active_cpu_isa() >= CpuIsa::kAvx2) return {&amax_avx2<T>, &quantize_avx2<T>};
  return {&amax_portable<T>, &quantize_portable<T>};
}

void check_2d_contiguous(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2, what, ": expected a 2-D tensor, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous(), what, ": expected a contiguous tensor");
}

std::tuple<at::Tensor, at::Tensor> cast_to_fp8_tiles_cpu(const at::Tensor& x, int64_t tile_rows,
                                                         int64_t tile_cols, bool use_ue8m0) {
  check_2d_contiguous(x, "cast_to_fp8_tiles: x");
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0, "cast_to_fp8_tiles: tile sizes must be positive");
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t tiles_m = (m + tile_rows - 1) / tile_rows, tiles_k = (k + tile_cols - 1) / tile_cols;
  auto out = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({tiles_m, tiles_k}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, scales};

  DSV3_DISPATCH_FLOAT_INPUTS(x.scalar_type(), "cast_to_fp8_tiles", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr());
    float* sfp = scales.data_ptr<float>();
    const SegmentOps<scalar_t> seg = segment_ops<scalar_t>();
    const int64_t tile_elems = tile_rows * tile_cols;
    const int64_t grain = std::max<int64_t>(1, 16384 / tile_elems);
    at::parallel_for(0, tiles_m * tiles_k, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = (t / tiles_k) * tile_rows, c0 = (t % tiles_k) * tile_cols;
        const int64_t rows = std::min(tile_rows, m - r0), cols = std::min(tile_cols, k - c0);
        float amax = 0.0f;
        for (int64_t r = r0; r < r0 + rows; ++r) amax = nan_max(amax, seg.amax(src + r * k + c0, cols));
        const float sf = scale_from_amax(amax, use_ue8m0);
        sfp[t] = sf;
        for (int64_t r = r0; r < r0 + rows; ++r) seg.quantize(src + r * k + c0, cols, sf, dst + r * k + c0);
      }
    });
  });
  return {out, scales};
}

// Quantizes x^T [K, M] in 1 x group tiles (group consecutive tokens of one channel), reading x
// [M, K] directly: the Wgrad operands of an FP8 linear layer.
std::tuple<at::Tensor, at::Tensor> cast_to_fp8_transposed_cpu(const at::Tensor& x, int64_t group,
                                                              bool use_ue8m0) {
  check_2d_contiguous(x, "cast_to_fp8_transposed: x");
  TORCH_CHECK(group > 0, "cast_to_fp8_transposed: group_size must be positive");
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t groups_m = (m + group - 1) / group;
  auto out = at::empty({k, m}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({k, groups_m}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, scales};

  constexpr int64_t kCols = 64;  // channels handled together: contiguous reads along a row
  const int64_t col_blocks = (k + kCols - 1) / kCols;
  DSV3_DISPATCH_FLOAT_INPUTS(x.scalar_type(), "cast_to_fp8_transposed", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr());
    float* sfp = scales.data_ptr<float>();
    at::parallel_for(0, groups_m * col_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> amax(kCols), sf(kCols);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / col_blocks, r0 = g * group, c0 = (t % col_blocks) * kCols;
        const int64_t rows = std::min(group, m - r0), cols = std::min(kCols, k - c0);
        std::fill(amax.begin(), amax.end(), 0.0f);
        for (int64_t r = r0; r < r0 + rows; ++r) {
          const scalar_t* row = src + r * k + c0;
          for (int64_t c = 0; c < cols; ++c) {
            float v = static_cast<float>(row[c]);
            amax[c] = nan_max(amax[c], v < 0 ? -v : v);
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          sf[c] = scale_from_amax(amax[c], use_ue8m0);
          sfp[(c0 + c) * groups_m + g] = sf[c];
        }
        for (int64_t r = r0; r < r0 + rows; ++r) {
          const scalar_t* row = src + r * k + c0;
          for (int64_t c = 0; c < cols; ++c) dst[(c0 + c) * m + r] = quantize_value(static_cast<float>(row[c]), sf[c]);
        }
      }
    });
  });
  return {out, scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("cast_to_fp8_tiles(Tensor x, int tile_rows, int tile_cols, bool use_ue8m0) -> (Tensor, Tensor)");
  m.def("cast_to_fp8_transposed(Tensor x, int group_size, bool use_ue8m0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("cast_to_fp8_tiles", &cast_to_fp8_tiles_cpu);
  m.impl("cast_to_fp8_transposed", &cast_to_fp8_transposed_cpu);
}

}  // namespace dsv3
