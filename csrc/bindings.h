// The binding layer (the only code that sees torch), shared by the per-op binding files
// csrc/<op>_binding.cpp: each validates every input with a message naming the argument, sets
// the device guard, takes the current stream and calls the torch-free launchers of
// csrc/<op>.cuh. The ops register as torch.ops.pyvit_ops_cuda (CUDA build, CUDA dispatch
// key) or, built with PYVIT_HOST_EMULATION by pyvit_ops.testing.host, as
// torch.ops.pyvit_ops_host (CPU dispatch key) running the same kernel source on the CPU.
//
// Adding an op: <op>.cuh (params struct + launcher declarations), <op>.cu (kernels +
// launchers), <op>_binding.cpp (implementation functions + a PV_TORCH_LIBRARY_FRAGMENT with the
// schemas and a PV_TORCH_LIBRARY_IMPL). The host build puts every file in one
// translation unit, so helpers of a binding file go in a namespace named after its op.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <climits>
#include <string>
#include <utility>

#ifndef PYVIT_HOST_EMULATION
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "api.h"

#ifdef PYVIT_HOST_EMULATION
#define PV_OPS_NAMESPACE pyvit_ops_host
#define PV_DISPATCH_KEY CPU
#define PV_BUILT_ARCHS "host-emulation"
#else
#define PV_OPS_NAMESPACE pyvit_ops_cuda
#define PV_DISPATCH_KEY CUDA
#ifndef PYVIT_ARCHS
#error "build with -DPYVIT_ARCHS=80,90 (the SM architectures of the .cu files; setup.py does)"
#endif
#define PV_STRINGIFY_(...) #__VA_ARGS__
#define PV_STRINGIFY(...) PV_STRINGIFY_(__VA_ARGS__)
#define PV_BUILT_ARCHS PV_STRINGIFY(PYVIT_ARCHS)
#endif
// TORCH_LIBRARY pastes its namespace argument: expand our macros one level earlier.
#define PV_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define PV_TORCH_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define PV_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace pyvit_bind {

#ifdef PYVIT_HOST_EMULATION
inline constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;

// CPU tensors: nothing to guard, and the emulated launches ignore the stream.
class DeviceContext {
 public:
  explicit DeviceContext(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};
#else
inline constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;

class DeviceContext {
 public:
  explicit DeviceContext(const at::Tensor& t) : guard_(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
};
#endif

inline void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
}

inline pyvit::DType check_float_tensor(const char* op, const char* name, const at::Tensor& t,
                                int64_t ndim) {
  TORCH_CHECK_VALUE(t.device().type() == kDeviceType, op, ": ", name, " must be a ",
                    c10::DeviceTypeName(kDeviceType), " tensor, got a tensor on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must have ", ndim,
                    " dimensions, got shape ", t.sizes());
  switch (t.scalar_type()) {
    case at::kFloat:
      return pyvit::DType::kFloat32;
    case at::kHalf:
      return pyvit::DType::kFloat16;
    case at::kBFloat16:
      return pyvit::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

// `t` is a float tensor of `ndim` dimensions with the dtype (else TypeError) and on the
// device of `ref`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, int64_t ndim,
                       const char* ref_name, const at::Tensor& ref) {
  check_float_tensor(op, name, t, ndim);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name,
                   " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
  check_same_device(op, name, t, ref_name, ref);
}

// (h, w) from a 1- or 2-element int list.
inline std::pair<int, int> hw_pair(const char* op, const char* name, c10::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, op, ": ", name,
                    " must have 1 or 2 elements, got ", v);
  const int64_t h = v[0], w = v.back();
  TORCH_CHECK_VALUE(h >= 0 && w >= 0 && h <= INT_MAX && w <= INT_MAX, op, ": ", name,
                    " must be non-negative, got ", v);
  return {static_cast<int>(h), static_cast<int>(w)};
}

inline void check_int32_image(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.sizes();
  TORCH_CHECK_VALUE(s[0] <= INT_MAX && s[1] * s[2] * s[3] <= INT_MAX, op, ": ", name,
                    " of shape ", s, " is too large: the kernels index one image (C*H*W "
                    "elements) in 32 bits");
}

}  // namespace pyvit_bind
