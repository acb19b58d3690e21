// avg_pool2d with count_include_pad=False, optionally fused with `- x` (PoolFormer's
// token mixer `pool(x) - x`). Launcher interface: no torch, no device code.
#pragma once

#include "api.h"

namespace pyvit {

// Forward reads `in` = x (N, C, H, W) and writes `out` (N, C, Ho, Wo).
// Backward reads `in` = grad_out (N, C, Ho, Wo) and writes `out` = grad_x (N, C, H, W).
// `in` is read through in_stride (elements; n, c, h, w order), so any layout works
// without a copy. `out` is contiguous, NCHW or (channels_last) NHWC. Window (oh, ow)
// covers rows [oh*sh - ph, oh*sh - ph + kh) and columns likewise, clipped to the image;
// the mean divides by the clipped size. subtract_input requires Ho == H and Wo == W.
// The caller guarantees C*H*W < 2^31 and C*Ho*Wo < 2^31 (one image is indexed in 32 bits).
struct AvgPool2dParams {
  DType dtype = DType::kFloat32;
  const void* in = nullptr;
  void* out = nullptr;
  std::int64_t in_stride[4] = {0, 0, 0, 0};
  int N = 0, C = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0;
  bool subtract_input = false;
  bool channels_last = false;
};

cudaError_t avg_pool2d_fwd(const AvgPool2dParams& params, cudaStream_t stream);
cudaError_t avg_pool2d_bwd(const AvgPool2dParams& params, cudaStream_t stream);

}  // namespace pyvit
