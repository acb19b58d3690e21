// avg_pool2d kernels (interface in avg_pool2d.cuh). One thread per output element in
// the forward and per grad_x element in the backward. The backward gathers: each
// grad_x element sums the grad_out elements whose window covers it, in a fixed order,
// so it needs no atomics and is deterministic. Accumulation is in float.
#include <algorithm>

#include "avg_pool2d.cuh"
#include "common.cuh"

namespace pyvit {

constexpr int kPoolThreads = 256;

// [lo, hi): the part of window [start, start + k) inside [0, size).
struct Span {
  int lo, hi;
  PV_DEVICE int size() const { return hi - lo; }
};
PV_DEVICE Span clip_window(int start, int k, int size) {
  return {max(start, 0), min(start + k, size)};
}

// Forward: the mean of output (h, w)'s window over its in-image taps, `x` at its plane.
template <typename T>
PV_DEVICE float window_mean(const AvgPool2dParams& p, const T* __restrict__ x, int h, int w) {
  const Span rows = clip_window(h * p.sh - p.ph, p.kh, p.H);
  const Span cols = clip_window(w * p.sw - p.pw, p.kw, p.W);
  float sum = 0.f;
  for (int ih = rows.lo; ih < rows.hi; ++ih) {
    const T* __restrict__ row = x + ih * p.in_stride[2];
    for (int iw = cols.lo; iw < cols.hi; ++iw) sum += to_float(row[iw * p.in_stride[3]]);
  }
  return sum / static_cast<float>(rows.size() * cols.size());
}

// Backward: grad_x (h, w) = sum of grad_out / window size over the windows covering
// (h, w), `dy` at its plane.
template <typename T>
PV_DEVICE float covering_sum(const AvgPool2dParams& p, const T* __restrict__ dy, int h, int w) {
  // Windows covering row h: oh*sh - ph <= h < oh*sh - ph + kh (columns likewise).
  const int oh_lo = h + p.ph < p.kh ? 0 : (h + p.ph - p.kh) / p.sh + 1;
  const int oh_hi = min((h + p.ph) / p.sh + 1, p.Ho);
  const int ow_lo = w + p.pw < p.kw ? 0 : (w + p.pw - p.kw) / p.sw + 1;
  const int ow_hi = min((w + p.pw) / p.sw + 1, p.Wo);
  float sum = 0.f;
  for (int oh = oh_lo; oh < oh_hi; ++oh) {
    const Span rows = clip_window(oh * p.sh - p.ph, p.kh, p.H);
    const T* __restrict__ row = dy + oh * p.in_stride[2];
    for (int ow = ow_lo; ow < ow_hi; ++ow) {
      const Span cols = clip_window(ow * p.sw - p.pw, p.kw, p.W);
      sum += to_float(row[ow * p.in_stride[3]]) / static_cast<float>(rows.size() * cols.size());
    }
  }
  return sum;
}

// One thread per element of the tensor written (the output, or grad_x), reading the
// same (n, c) plane of `in` (x, or grad_out). With kSubtract (stride 1, same size) the
// element at the thread's own (h, w) is one of the taps just read: a cache hit.
template <typename T, bool kBackward, bool kSubtract, bool kChannelsLast>
__global__ void __launch_bounds__(kPoolThreads)
    avg_pool2d_kernel(const AvgPool2dParams p, const NchwIndex index, const std::uint32_t total) {
  const std::uint32_t i = blockIdx.x * kPoolThreads + threadIdx.x;
  if (i >= total) return;
  const Coord4 o = index.at<kChannelsLast>(i);
  const T* __restrict__ in =
      static_cast<const T*>(p.in) + o.n * p.in_stride[0] + o.c * p.in_stride[1];
  float y = kBackward ? covering_sum(p, in, o.h, o.w) : window_mean(p, in, o.h, o.w);
  if constexpr (kSubtract) y -= to_float(in[o.h * p.in_stride[2] + o.w * p.in_stride[3]]);
  static_cast<T*>(p.out)[i] = from_float<T>(y);
}

template <bool kBackward>
cudaError_t launch_avg_pool2d(const AvgPool2dParams& p, cudaStream_t stream) {
  const int out_h = kBackward ? p.H : p.Ho;
  const int out_w = kBackward ? p.W : p.Wo;
  const std::int64_t image = std::int64_t{p.C} * out_h * out_w;
  if (p.N == 0 || image == 0) return cudaSuccess;
  const NchwIndex index(p.C, out_h, out_w, p.channels_last);
  const std::int64_t images_per_launch =
      std::max<std::int64_t>(1, PV_MAX_LAUNCH_ELEMENTS / image);
  return PV_DTYPE_SWITCH(p.dtype, T, [&] {
    return PV_BOOL_SWITCH(p.subtract_input, kSubtract, [&] {
      return PV_BOOL_SWITCH(p.channels_last, kChannelsLast, [&] {
        const auto kernel = avg_pool2d_kernel<T, kBackward, kSubtract, kChannelsLast>;
        for (std::int64_t n0 = 0; n0 < p.N; n0 += images_per_launch) {
          AvgPool2dParams chunk = p;
          chunk.N = static_cast<int>(std::min<std::int64_t>(images_per_launch, p.N - n0));
          chunk.in = static_cast<const T*>(p.in) + n0 * p.in_stride[0];
          chunk.out = static_cast<T*>(p.out) + n0 * image;
          const auto total = static_cast<std::uint32_t>(chunk.N * image);
          PV_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(total, kPoolThreads))),
                    dim3(kPoolThreads), 0, stream, chunk, index, total);
          const cudaError_t error = cudaGetLastError();
          if (error != cudaSuccess) return error;
        }
        return cudaSuccess;
      });
    });
  });
}

cudaError_t avg_pool2d_fwd(const AvgPool2dParams& params, cudaStream_t stream) {
  return launch_avg_pool2d<false>(params, stream);
}

cudaError_t avg_pool2d_bwd(const AvgPool2dParams& params, cudaStream_t stream) {
  return launch_avg_pool2d<true>(params, stream);
}

}  // namespace pyvit
