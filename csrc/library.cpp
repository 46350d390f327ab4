// The TORCH_LIBRARY(fastkd) definition and the load-time CPU instruction-set check (library.h).
#include "library.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace fastkd {
namespace {

bool detect_cpu_isa_support() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return true;
#endif
}

// Evaluated once, when the shared library is loaded.
const bool kCpuIsaSupported = detect_cpu_isa_support();

}  // namespace

const char* cpu_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

bool cpu_isa_supported() { return kCpuIsaSupported; }

void check_cpu_isa(const char* op) {
  TORCH_CHECK(kCpuIsaSupported, op, ": fastkd was compiled for ", cpu_isa(),
              " but this CPU lacks it; rebuild with FASTKD_CPU_ISA=AVX2 or DEFAULT");
}

}  // namespace fastkd

// Each op's source file adds its schemas and kernels with TORCH_LIBRARY_FRAGMENT / _IMPL.
TORCH_LIBRARY(fastkd, m) {}
