// Swin window attention (W-MSA / SW-MSA) of image-layout token grids. Launcher
// interface: no torch, no device code.
#pragma once

#include "api.h"

namespace pyvit {

// Largest window area (wh * ww) the kernels take (24 x 24, Swin V2's largest window):
// the kernels sweep a window in 64-token tiles, at most 9 of them.
constexpr int kWindowAttentionMaxArea = 576;

// A (B, H, W, heads, D) tensor read through its strides (elements, in that order).
struct WindowAttentionTokens {
  const void* data = nullptr;
  std::int64_t stride[5] = {0, 0, 0, 0, 0};
};

// Semantics of timm's SwinTransformerBlock._attn (pyvit_ops.reference.window_attention):
// roll by (-sh, -sw), pad bottom / right to window multiples, attend inside each
// wh x ww window with the relative position bias and, where shifted, mask_value between
// shift regions; un-partition, crop, roll back. With a gain (Swin V2's cosine attention)
// the scores are gain * q k^T / (max(|q|, eps) max(|k|, eps)), eps = 1e-12, and `scale` is
// not used. Window w of num_windows =
// B * ceil(H / wh) * ceil(W / ww) is (b, wy, wx) in row-major order.
//
// The caller guarantees: 1 <= wh <= H, 1 <= ww <= W, wh * ww <= kWindowAttentionMaxArea,
// 0 <= sh < wh, 0 <= sw < ww; every element offset inside one image of q, k, v and
// dout, the H * W * heads * D elements of one output image and the
// H * W * grad_token_stride of one gradient image fit in int32; num_windows * heads < 2^31.
struct WindowAttentionParams {
  DType dtype = DType::kFloat32;  // of q, k, v, out, dout and the token outputs
  int B = 0, H = 0, W = 0, heads = 0, D = 0;
  int wh = 1, ww = 1, sh = 0, sw = 0;
  // MaxViT's grid attention (timm's grid_partition): slot (ty, tx) of window (wy, wx) is
  // token (ty * n_wh + wy, tx * n_ww + wx); the caller guarantees H % wh == W % ww == 0
  // and no shift.
  bool grid_partition = false;
  float scale = 1.f;         // applied to q k^T
  float mask_value = -100.f;  // added between tokens of different shift regions
  // Cosine attention: (heads,) fp32, exp(min(logit_scale, log 100)); null: scaled q k^T.
  const float* gain = nullptr;
  WindowAttentionTokens q, k, v;
  // ((2wh - 1)(2ww - 1), heads) fp32 contiguous, or null (no bias).
  const float* table = nullptr;
  // Key / value of padded tokens: (heads, D) fp32 contiguous (already rounded to
  // dtype), or null for zeros.
  const float* pad_k = nullptr;
  const float* pad_v = nullptr;
  // Forward outputs: out (contiguous (B, H, W, heads, D)) and lse, per score row its
  // max m and log2 of its sum of exp(score - m), apart (one float m log2(e) + log2(l)
  // would round log2(l) next to a large m): fp32 contiguous (num_windows, heads, wh * ww, 2).
  void* out = nullptr;
  float* lse = nullptr;
  // Backward inputs: the output gradient and the forward's lse (the backward does not
  // need the forward's output).
  WindowAttentionTokens dout;
  const float* lse_in = nullptr;
  // Backward outputs: dq, dk, dv (B, H, W, heads, D) with dense rows, tokens
  // grad_token_stride elements apart: heads * D (contiguous) or 3 * heads * D (the
  // slices of one packed (B, H, W, 3, heads, D) gradient); when table_grad,
  // dtable ((2wh - 1)(2ww - 1), heads) fp32; when pad_grad, dpad (2, heads, D) fp32
  // (dpad_k then dpad_v; with a gain, dpad_k is the gradient of the normalised pad key
  // pad_k / max(|pad_k|, eps), summed over all padded slots, and the caller takes it
  // through the normalisation once); when gain_grad (with a gain), dlog_gain (heads,) fp32, the
  // gradient of log(gain). workspace: window_attention_bwd_workspace_floats(params)
  // floats, no initial value needed.
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  int grad_token_stride = 0;
  bool table_grad = false, pad_grad = false, gain_grad = false;
  float* dtable = nullptr;
  float* dpad = nullptr;
  float* dlog_gain = nullptr;
  float* workspace = nullptr;
};

cudaError_t window_attention_fwd(const WindowAttentionParams& params, cudaStream_t stream);
cudaError_t window_attention_bwd(const WindowAttentionParams& params, cudaStream_t stream);

// Scratch floats the backward needs for its deterministic reductions (per-block
// partial sums of the table, pad and log-gain gradients), given the geometry and the flags.
std::int64_t window_attention_bwd_workspace_floats(const WindowAttentionParams& params);

// Dynamic shared memory per block of the forward / backward kernel, in bytes.
int window_attention_shared_bytes(int window_area, bool backward);

}  // namespace pyvit
