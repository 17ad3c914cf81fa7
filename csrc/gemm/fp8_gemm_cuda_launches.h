// Launch counts of the CUDA FP8 GEMM kernels, so that tests can see which kernel a call took
// (the Hopper kernels fall back when an operand does not suit them).
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace dsv3 {

// Launches of each kernel ("mma_sync", "wgmma", "tma") since the extension was loaded.
std::map<std::string, int64_t> fp8_gemm_cuda_launches();

}  // namespace dsv3
