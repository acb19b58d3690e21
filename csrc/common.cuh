// Device-side helpers shared by every kernel (.cu files only; never includes torch).
// The same source compiles with nvcc for the GPU and, with PYVIT_HOST_EMULATION, with
// g++ for the CPU test harness (host_emulation.h).
#pragma once

#include "api.h"

#ifndef PYVIT_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#define PV_HOST_DEVICE __host__ __device__ __forceinline__
#define PV_DEVICE __device__ __forceinline__

// Kernels index a launch in 32 bits; launchers split larger work into launches of at most
// this many elements (whole images). The host-emulation build lowers it so that tests
// with small tensors exercise the split.
#ifndef PV_MAX_LAUNCH_ELEMENTS
#define PV_MAX_LAUNCH_ELEMENTS 0x7FFFFFFF
#endif

// kernel<<<grid, block, smem, stream>>>(args...). Wrap a template-id in parentheses
// (PV_LAUNCH((k<T, B>), ...)) or launch through a function pointer; check the result
// with cudaGetLastError().
#ifdef PYVIT_HOST_EMULATION
#define PV_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (static_cast<void>(stream),                             \
   ::pyvit_host::launch(kernel, grid, block, smem __VA_OPT__(, ) __VA_ARGS__))
#else
#define PV_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

// `T* name` pointing at the block's dynamic shared memory (the launch's smem bytes).
// One byte array for every kernel, so kernels of one translation unit don't clash.
#ifdef PYVIT_HOST_EMULATION
#define PV_DYNAMIC_SHARED(T, name) \
  T* name = reinterpret_cast<T*>(::pyvit_host::dynamic_shared_memory())
#else
#define PV_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char pv_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(pv_dynamic_smem_)
#endif

// Compile-time dispatch: run the lambda `...` with TYPE bound to the C++ element type of
// DTYPE (a pyvit::DType), or with NAME a constexpr bool equal to COND. Nest them to
// instantiate every combination; the lambda's return value is passed through.
#define PV_DTYPE_SWITCH(DTYPE, TYPE, ...)        \
  [&] {                                          \
    switch (DTYPE) {                             \
      case ::pyvit::DType::kFloat16: {           \
        using TYPE = __half;                     \
        return __VA_ARGS__();                    \
      }                                          \
      case ::pyvit::DType::kBFloat16: {          \
        using TYPE = __nv_bfloat16;              \
        return __VA_ARGS__();                    \
      }                                          \
      case ::pyvit::DType::kFloat32:             \
      default: {                                 \
        using TYPE = float;                      \
        return __VA_ARGS__();                    \
      }                                          \
    }                                            \
  }()

#define PV_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                  \
    if (COND) {                          \
      constexpr static bool NAME = true; \
      return __VA_ARGS__();              \
    }                                    \
    constexpr static bool NAME = false;  \
    return __VA_ARGS__();                \
  }()

namespace pyvit {

// Loads widen to float, stores round to nearest even: kernels accumulate in float.
PV_HOST_DEVICE float to_float(float v) { return v; }
PV_HOST_DEVICE float to_float(__half v) { return __half2float(v); }
PV_HOST_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
PV_HOST_DEVICE T from_float(float v);
template <>
PV_HOST_DEVICE float from_float<float>(float v) {
  return v;
}
template <>
PV_HOST_DEVICE __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
PV_HOST_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

PV_HOST_DEVICE std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// n / d and n % d for n < 2^31 by multiply-high and shift instead of a ~20-instruction
// integer division: index math of memory-bound kernels otherwise costs more than the
// loads. The magic numbers are computed once on the host (round-up method).
struct FastDivmod {
  std::uint32_t divisor = 1, multiplier = 1, shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(std::uint32_t d) : divisor(d) {
    while ((std::uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<std::uint32_t>(
        ((std::uint64_t{1} << 32) * ((std::uint64_t{1} << shift) - d)) / d + 1);
  }

  PV_DEVICE std::uint32_t div(std::uint32_t n) const {
    return (__umulhi(n, multiplier) + n) >> shift;
  }
  PV_DEVICE std::uint32_t divmod(std::uint32_t n, std::uint32_t& rem) const {
    const std::uint32_t q = div(n);
    rem = n - q * divisor;
    return q;
  }
};

// (n, c, h, w) of a linear index into a contiguous 4-D tensor in NCHW or NHWC
// (channels_last) order: consecutive threads walk the fastest dimension, so loads and
// stores stay coalesced in either layout.
struct Coord4 {
  int n, c, h, w;
};

struct NchwIndex {
  FastDivmod fast0, fast1, fast2;  // the three fastest-varying dimensions, fastest first

  NchwIndex(int C, int H, int W, bool channels_last)
      : fast0(channels_last ? C : W), fast1(channels_last ? W : H), fast2(channels_last ? H : C) {}

  template <bool kChannelsLast>
  PV_DEVICE Coord4 at(std::uint32_t i) const {
    std::uint32_t r0, r1, r2;
    const int n = static_cast<int>(fast2.divmod(fast1.divmod(fast0.divmod(i, r0), r1), r2));
    if constexpr (kChannelsLast) {
      return {n, static_cast<int>(r0), static_cast<int>(r2), static_cast<int>(r1)};
    } else {
      return {n, static_cast<int>(r2), static_cast<int>(r1), static_cast<int>(r0)};
    }
  }
};

}  // namespace pyvit
