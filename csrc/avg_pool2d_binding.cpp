// Binding of avg_pool2d (see bindings.h): validation, device guard, stream, launch.
#include "bindings.h"

#include "avg_pool2d.cuh"

namespace avg_pool2d_bind {

using namespace pyvit_bind;

// Geometry and memory layout shared by the forward and backward.
pyvit::AvgPool2dParams avg_pool2d_params(const char* op, const at::Tensor& x,
                                         c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                         c10::IntArrayRef padding, bool subtract_input) {
  pyvit::AvgPool2dParams p;
  p.dtype = check_float_tensor(op, "x", x, 4);
  check_int32_image(op, "x", x);
  std::tie(p.kh, p.kw) = hw_pair(op, "kernel_size", kernel_size);
  std::tie(p.sh, p.sw) = hw_pair(op, "stride", stride);
  std::tie(p.ph, p.pw) = hw_pair(op, "padding", padding);
  TORCH_CHECK_VALUE(p.kh > 0 && p.kw > 0, op, ": kernel_size must be positive, got ",
                    kernel_size);
  TORCH_CHECK_VALUE(p.sh > 0 && p.sw > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(p.ph <= p.kh / 2 && p.pw <= p.kw / 2, op,
                    ": padding must be at most half of kernel_size, got padding ", padding,
                    " for kernel_size ", kernel_size);
  p.N = static_cast<int>(x.size(0));
  p.C = static_cast<int>(x.size(1));
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  const int64_t span_h = int64_t{p.H} + 2 * p.ph - p.kh;
  const int64_t span_w = int64_t{p.W} + 2 * p.pw - p.kw;
  TORCH_CHECK_VALUE(span_h >= 0 && span_w >= 0, op, ": kernel_size ", kernel_size,
                    " with padding ", padding, " does not fit the input of shape ", x.sizes());
  p.Ho = static_cast<int>(span_h / p.sh + 1);
  p.Wo = static_cast<int>(span_w / p.sw + 1);
  TORCH_CHECK_VALUE(!subtract_input || (p.Ho == p.H && p.Wo == p.W), op,
                    ": subtract_input=True needs an output of the input's size (stride 1, "
                    "odd kernel_size, padding = kernel_size // 2), got kernel_size ",
                    kernel_size, ", stride ", stride, ", padding ", padding);
  p.subtract_input = subtract_input;
  p.channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return p;
}

// Runs `launcher` reading `in` (through its strides) and writing `out`; returns `out`.
at::Tensor launch(const char* op, pyvit::AvgPool2dParams& p, const at::Tensor& in, at::Tensor out,
                  cudaError_t (*launcher)(const pyvit::AvgPool2dParams&, cudaStream_t)) {
  if (out.numel() == 0) return out;
  const DeviceContext context(in);
  p.in = in.const_data_ptr();
  p.out = out.mutable_data_ptr();
  for (int d = 0; d < 4; ++d) p.in_stride[d] = in.stride(d);
  check_launch(launcher(p, context.stream()), op);
  return out;
}

at::Tensor avg_pool2d_fwd(const at::Tensor& x, c10::IntArrayRef kernel_size,
                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                          bool subtract_input) {
  constexpr const char* op = "avg_pool2d_fwd";
  pyvit::AvgPool2dParams p =
      avg_pool2d_params(op, x, kernel_size, stride, padding, subtract_input);
  at::Tensor out = at::empty({p.N, p.C, p.Ho, p.Wo},
                             x.options().memory_format(x.suggest_memory_format()));
  check_int32_image(op, "the output", out);
  return launch(op, p, x, out, pyvit::avg_pool2d_fwd);
}

at::Tensor avg_pool2d_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                          c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, bool subtract_input) {
  constexpr const char* op = "avg_pool2d_bwd";
  pyvit::AvgPool2dParams p =
      avg_pool2d_params(op, x, kernel_size, stride, padding, subtract_input);
  check_like(op, "grad_out", grad_out, 4, "x", x);
  TORCH_CHECK_VALUE(grad_out.sizes() == c10::IntArrayRef({p.N, p.C, p.Ho, p.Wo}), op,
                    ": grad_out must have the output shape [", p.N, ", ", p.C, ", ", p.Ho, ", ",
                    p.Wo, "], got ", grad_out.sizes());
  return launch(op, p, grad_out,
                at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format())),
                pyvit::avg_pool2d_bwd);
}

// The most images and elements per image (input or output) the kernels index in 32 bits
// (check_int32_image), for the Python layer to ask before launching.
int64_t avg_pool2d_image_limit() { return INT_MAX; }

}  // namespace avg_pool2d_bind

PV_TORCH_LIBRARY_FRAGMENT(PV_OPS_NAMESPACE, m) {
  m.def(
      "avg_pool2d_fwd(Tensor x, int[] kernel_size, int[] stride, int[] padding, "
      "bool subtract_input) -> Tensor");
  m.def(
      "avg_pool2d_bwd(Tensor grad_out, Tensor x, int[] kernel_size, int[] stride, "
      "int[] padding, bool subtract_input) -> Tensor");
  m.def("avg_pool2d_image_limit() -> int", &avg_pool2d_bind::avg_pool2d_image_limit);
}

PV_TORCH_LIBRARY_IMPL(PV_OPS_NAMESPACE, PV_DISPATCH_KEY, m) {
  m.impl("avg_pool2d_fwd", &avg_pool2d_bind::avg_pool2d_fwd);
  m.impl("avg_pool2d_bwd", &avg_pool2d_bind::avg_pool2d_bwd);
}
