// The Python module ops._C. Kernels register themselves with torch.library under the "dsv3"
// namespace (TORCH_LIBRARY_FRAGMENT in each source file); this file only adds the few helpers
// that are not tensor ops.
#include <torch/extension.h>

#include "common/cpu_features.h"
#ifdef DSV3_WITH_CUDA
#include "gemm/fp8_gemm_cuda_launches.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of the DeepSeek-V3 training stack (CPU always, CUDA when built)";
  m.def("detected_cpu_isa", [] { return dsv3::cpu_isa_name(dsv3::detected_cpu_isa()); },
        "Best instruction set this CPU supports: 'portable', 'avx2', 'avx512' or 'amx'.");
  m.def("active_cpu_isa", [] { return dsv3::cpu_isa_name(dsv3::active_cpu_isa()); },
        "Instruction set the CPU kernels use now.");
  m.def("set_cpu_isa", &dsv3::set_cpu_isa, pybind11::arg("isa"),
        "Caps the CPU instruction set ('portable', 'avx2', 'avx512', 'amx'; 'auto': DSV3_CPU_ISA or the "
        "highest verified one); returns the active one.");
#ifdef DSV3_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("fp8_gemm_cuda_launches", &dsv3::fp8_gemm_cuda_launches,
        "Launches of each CUDA FP8 GEMM kernel (mma_sync, wgmma, tma) since the extension loaded.");
#else
  m.attr("with_cuda") = false;
#endif
}
