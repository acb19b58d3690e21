// Library definition and build information; each op's schemas and implementations are
// in csrc/<op>_binding.cpp (see bindings.h).
#include "bindings.h"

#include <string>

namespace {

std::string built_archs() { return PV_BUILT_ARCHS; }

}  // namespace

PV_TORCH_LIBRARY(PV_OPS_NAMESPACE, m) {
  // Comma-separated SM architectures the kernels were compiled for ("host-emulation" for
  // the CPU test build).
  m.def("built_archs() -> str", &built_archs);
}
#ifndef PYVIT_HOST_EMULATION
// `import pyvit_ops._C` loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C",
      "pyvit_ops CUDA kernels; importing registers them as torch.ops.pyvit_ops_cuda.", -1,
      nullptr};
  return PyModule_Create(&module);
}
#endif
