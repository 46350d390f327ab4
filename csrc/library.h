// The fastkd op library: the TORCH_LIBRARY(fastkd) namespace every op file adds its schemas to
// (TORCH_LIBRARY_FRAGMENT), the CPU instruction-set check and the parallel grain all CPU kernels share.
//
// The CPU sources are compiled with the vector ISA flags of the build machine (at::vec and the
// compiler's auto-vectorisation both use them). Whether the running CPU supports that ISA is
// decided once, when the library is loaded; every CPU kernel calls check_cpu_isa() on entry, so a
// binary moved to an older CPU raises a clear error instead of dying on an illegal instruction.
#pragma once

#include <ATen/TensorIterator.h>

#include <algorithm>
#include <cstdint>

namespace fastkd {

// Items (rows, samples, tiles) per at::parallel_for task for items of `work` elements each: a task
// touches at least at::internal::GRAIN_SIZE elements, so a problem below that runs inline on the
// calling thread (no thread wake-up, no task split), as ATen's own element-wise ops do.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

// The CPU vector instruction set the kernels were compiled for ("AVX512", "AVX2", "DEFAULT").
const char* cpu_isa();

// Whether the CPU running this process supports cpu_isa() (measured once, at load).
bool cpu_isa_supported();

// Raise (c10::Error naming `op`) when this CPU lacks cpu_isa().
void check_cpu_isa(const char* op);

}  // namespace fastkd
