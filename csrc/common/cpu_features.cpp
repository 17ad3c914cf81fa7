#include "cpu_features.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dsv3 {
namespace {

// The highest instruction set whose kernels have run and passed the tests on a real CPU. "auto"
// (the default) stops here even where the CPU has more: the AVX-512 kernels (gemm_avx512.cpp)
// and the AMX-BF16 kernels (gemm_amx.cpp) were written and compiled on an AVX2-only machine and
// have only run under emulation, so they are used only when asked for by name
// (set_cpu_isa("avx512" or "amx") or DSV3_CPU_ISA=avx512 / amx; still capped by what the CPU
// has). Raise it once `DSV3_CPU_ISA=avx512 pytest tests/ops -k gemm` (then amx) passes on such a
// CPU (bench/gpu_check.sh runs both on the GPU machine's host).
constexpr CpuIsa kHighestVerifiedIsa = CpuIsa::kAvx2;

#if defined(__x86_64__)
bool os_grants_amx() {
  // Linux keeps AMX tile state off until a process asks for it; the first tile instruction
  // would otherwise kill the process. ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

CpuIsa detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();  // libgcc's checks include the OS's XSAVE state for AVX and AVX-512
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return CpuIsa::kPortable;
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
  if (!((ecx >> 29) & 1u)) return CpuIsa::kPortable;  // F16C
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return CpuIsa::kAvx2;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  bool amx = ((edx >> 22) & 1u) && ((edx >> 24) & 1u);  // AMX-BF16, AMX-TILE
  if (amx && os_grants_amx()) return CpuIsa::kAmx;
  return CpuIsa::kAvx512;
#else
  return CpuIsa::kPortable;
#endif
}

// An instruction set's name; "auto" is not one (it stands for default_cap()).
bool parse(const std::string& name, CpuIsa* out) {
  if (name == "portable") *out = CpuIsa::kPortable;
  else if (name == "avx2") *out = CpuIsa::kAvx2;
  else if (name == "avx512") *out = CpuIsa::kAvx512;
  else if (name == "amx") *out = CpuIsa::kAmx;
  else return false;
  return true;
}

// The cap "auto" stands for, at start-up and whenever set_cpu_isa("auto") is called: the
// instruction set DSV3_CPU_ISA names, else kHighestVerifiedIsa. (So a process started with
// DSV3_CPU_ISA=avx512 returns to AVX-512 when a test restores "auto".)
CpuIsa default_cap() {
  static const CpuIsa cap = [] {
    const char* env = std::getenv("DSV3_CPU_ISA");
    CpuIsa named;
    if (env != nullptr && parse(env, &named)) return named;
    if (env != nullptr && std::string(env) != "auto")
      std::fprintf(stderr, "dsv3: ignoring DSV3_CPU_ISA='%s' (expected portable, avx2, avx512, amx or auto)\n", env);
    return kHighestVerifiedIsa;
  }();
  return cap;
}

std::atomic<int> g_cap{static_cast<int>(default_cap())};

}  // namespace

CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa active_cpu_isa() {
  int cap = g_cap.load(std::memory_order_relaxed);
  int best = static_cast<int>(detected_cpu_isa());
  return static_cast<CpuIsa>(cap < best ? cap : best);
}

std::string set_cpu_isa(const std::string& name) {
  CpuIsa cap = default_cap();
  if (name != "auto" && !parse(name, &cap))
    throw std::invalid_argument("set_cpu_isa: isa must be 'portable', 'avx2', 'avx512', 'amx' or 'auto', got '" +
                                name + "'");
  g_cap = static_cast<int>(cap);
  return cpu_isa_name(active_cpu_isa());
}

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAmx: return "amx";
    default: return "portable";
  }
}

}  // namespace dsv3
