// Run-time choice of the CPU instruction set. The extension is never built with
// -march=native: vector code lives in files or functions with their own target pragma or
// attribute, and is chosen here from cpuid.
#pragma once

#include <string>

namespace dsv3 {

// Ordered: each level implies the ones below it.
enum class CpuIsa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// Best instruction set this CPU and OS support (cpuid + OS state; AMX needs the kernel's
// permission, which this requests once).
CpuIsa detected_cpu_isa();

// The instruction set kernels use now: the detected one, capped. The cap is set by name with
// set_cpu_isa or, at start-up, the DSV3_CPU_ISA environment variable; without either ("auto") it
// is the highest instruction set whose kernels have been verified on a real CPU (AVX2 for now:
// kHighestVerifiedIsa in cpu_features.cpp), so AVX-512 kernels run only when asked for by name.
CpuIsa active_cpu_isa();

// Caps the instruction set ("portable", "avx2", "avx512", "amx"; "auto" restores the default cap:
// DSV3_CPU_ISA's value if set, else the highest verified one); returns the active one. Throws
// std::invalid_argument for other names.
std::string set_cpu_isa(const std::string& name);

std::string cpu_isa_name(CpuIsa isa);

}  // namespace dsv3
