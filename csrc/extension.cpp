// The Python module fastkd._C. Loading it registers every TORCH_LIBRARY op compiled into it
// (torch.ops.fastkd.*); the module itself only reports how it was built.
#include <torch/extension.h>

#include "library.h"

#ifndef FASTKD_VERSION
#define FASTKD_VERSION "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FASTKD_VERSION;
  info["torch"] = TORCH_VERSION;
  info["cpu_isa"] = fastkd::cpu_isa();
  info["cpu_isa_supported"] = fastkd::cpu_isa_supported();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef FASTKD_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = FASTKD_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = pybind11::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastkd native ops (registered as torch.ops.fastkd.*)";
  m.def("build_info", &build_info,
        "How the extension was built: version, torch, CPU vector ISA, OpenMP, CUDA and its archs.");
}
