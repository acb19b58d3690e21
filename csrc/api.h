// What the binding layer shares with the kernels: dtype tags and the stream / error
// types of the launchers. No torch and no device code, so both g++ (bindings.cpp)
// and nvcc (the .cu files) can include it.
#pragma once

#include <cstdint>

#ifdef PYVIT_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace pyvit {

// Element type of a launcher's tensors; kernels are templated on the matching C++ type
// (float / __half / __nv_bfloat16) through PV_DTYPE_SWITCH.
enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16 };

}  // namespace pyvit
