// ELSA local aggregation with the ghost head, forward and backward.
// Launcher interface: no torch, no device code.
//
// y[b, c, o] = sum_t (M[c, t] * A[b, g, t, o] + D[c, t]) * v[b, c, o + delta_t], head g = c / Cg,
// A the softmax of attn over the K*K taps (apply_softmax) or attn itself, zero padding, no
// renormalisation at the border.
#pragma once

#include <cstddef>

#include "api.h"

namespace pyvit {

// Odd window sizes the kernels are compiled for (they unroll the taps of a row).
constexpr int kElsaMaxKernelSize = 13;

// Samples per attn-gradient block when ghost gradients are reduced, unless a call sets its
// own: 0 is the GPU rule (enough to keep about a thousand blocks). The host-emulation build
// puts two samples in a block, so that small tests cover both the accumulation over a
// block's samples and the reduction over several partial rows.
#ifdef PYVIT_HOST_EMULATION
constexpr int kElsaDefaultSamplesPerBlock = 2;
#else
constexpr int kElsaDefaultSamplesPerBlock = 0;
#endif

// A (B, channels, H, W) tensor read or written through its strides (elements). The batch
// stride is 64-bit; offsets within one sample must fit in 32 bits (the caller checks).
struct ElsaTensor {
  const void* data = nullptr;
  std::int64_t stride[4] = {0, 0, 0, 0};
  // Channels are the densest axis (stride 1): staging loops walk channels fastest then.
  bool channels_last = false;
};

struct ElsaAttentionParams {
  DType dtype = DType::kFloat32;  // of v, attn, dout and every (B, ., H, W) output
  int B = 0, C = 0, G = 0, H = 0, W = 0, K = 1, dilation = 1;
  bool apply_softmax = true;

  // Planning limits: the shared memory a block may use (bytes; 0: the current device's
  // opt-in maximum, an A100's 163 KB in the host-emulation build) and the samples per
  // attn-gradient block (see kElsaDefaultSamplesPerBlock).
  std::size_t smem_budget = 0;
  int samples_per_block = kElsaDefaultSamplesPerBlock;

  ElsaTensor v, attn;
  // (C, K*K, 2) float32, contiguous: (M, D) per channel and tap, the ghost head with the
  // missing tensor filled in (M = 1 or D = 0); nullptr when neither tensor is given.
  const float* ghost = nullptr;
  bool has_mul = false;  // ghost_mul was given (M is not all ones)

  // Forward: writes out (B, C, H, W).
  ElsaTensor out;  // data is written

  // Backward: reads dout; writes what need_* asks for. dghost_mul / dghost_add are
  // (C, K, K) contiguous in their own dtype, fully overwritten (sums over batch and pixels).
  ElsaTensor dout, dv, dattn;
  bool need_dv = false, need_dattn = false, need_dmul = false, need_dadd = false;
  void* dghost_mul = nullptr;
  void* dghost_add = nullptr;
  DType dmul_dtype = DType::kFloat32, dadd_dtype = DType::kFloat32;
  void* workspace = nullptr;  // elsa_attention_bwd_workspace_bytes(), 256-byte aligned
};

// Why these sizes cannot run (a message for the user), or nullptr when they can.
const char* elsa_attention_unsupported(const ElsaAttentionParams& params);

// The launch plan of these sizes and limits: tile (TH x TW sub-grid pixels), staged
// channel chunk, blocks per (sample, head), dynamic shared memory of the aggregation
// and attn-gradient kernels and samples per attn-gradient block (with the need_* flags).
struct ElsaPlanInfo {
  int tile_h = 0, tile_w = 0, chunk = 0;
  std::int64_t tiles = 0;
  std::size_t aggregate_smem = 0, attn_smem = 0;
  int samples_per_block = 0;
};

// False when no tile fits the shared-memory budget (or the sizes are empty).
bool elsa_attention_plan(const ElsaAttentionParams& params, ElsaPlanInfo& info);

// Scratch the backward needs (per-pixel softmax normalisers, ghost-gradient partial sums).
std::size_t elsa_attention_bwd_workspace_bytes(const ElsaAttentionParams& params);

cudaError_t elsa_attention_fwd(const ElsaAttentionParams& params, cudaStream_t stream);
cudaError_t elsa_attention_bwd(const ElsaAttentionParams& params, cudaStream_t stream);

}  // namespace pyvit
