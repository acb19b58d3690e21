// scaled_dot_product_attention: softmax(q k^T * scale + bias) v, forward and backward.
// Launcher interface: no torch, no device code.
#pragma once

#include "api.h"

namespace pyvit {

// How the bias is read: absent, a bool mask (bytes, nonzero = attend), float32, or the
// dtype of q.
enum class SdpaBias : std::uint8_t { kNone, kBool, kFloat32, kSameAsQ };

// Tensors are (Z1, Z2, N, D) (bias (Z1, Z2, Nq, Nk)), read through strides in elements
// (z1, z2, row, col order); broadcast bias dims have stride 0. Output out is contiguous,
// dq, dk, dv are written through dq_stride / dk_stride / dv_stride; delta is contiguous
// fp32 (Z1, Z2, Nq) scratch (the backward's rowsum(P * dP)), lse contiguous fp32
// (Z1, Z2, Nq, 2): each row's max logit and log2 of its sum of exponentials. dbias (float32 or q's dtype, per dbias_f32) is written
// through db_stride, 0 on the dims it is reduced over.
// Dropout keeps element (z, i, j) when the first Philox-4x32-10 output for counter
// (i * Nk + j, z, seed low, seed high) and key (0, 0) is >= dropout_threshold. The
// kernels read the seed from device memory (*seed): the host never reads it, and a
// CUDA graph replays the read, not a captured value.
struct SdpaParams {
  DType dtype = DType::kFloat32;
  SdpaBias bias_kind = SdpaBias::kNone;
  const void *q = nullptr, *k = nullptr, *v = nullptr, *bias = nullptr;
  const void* dout = nullptr;
  void* out_w = nullptr;
  float* lse = nullptr;
  float* delta = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr, *dbias = nullptr;
  std::int64_t q_stride[4] = {}, k_stride[4] = {}, v_stride[4] = {}, b_stride[4] = {};
  std::int64_t do_stride[4] = {}, db_stride[4] = {};
  std::int64_t dq_stride[4] = {}, dk_stride[4] = {}, dv_stride[4] = {};
  int Z1 = 0, Z2 = 0, Nq = 0, Nk = 0, D = 0;
  float scale = 1.f, dropout_scale = 1.f;
  bool dropout = false;
  std::uint32_t dropout_threshold = 0;
  const std::int64_t* seed = nullptr;
  bool dbias_f32 = false;
};

// Largest head dim the kernels take.
constexpr int kSdpaMaxHeadDim = 128;

// Writes out_w (contiguous, q's dtype) and lse.
cudaError_t scaled_dot_product_attention_fwd(const SdpaParams& params, cudaStream_t stream);
// Writes delta (scratch), dq, dk, dv and, if dbias is set, dbias (its reduced shape;
// the caller handles a bias broadcast along the keys, whose gradient is zero). With
// one key (Nk == 1) softmax is constant: dq, dk and dbias are exactly zero, which the
// caller writes over dq and dk (dbias is not computed); the kernels' dS = P (dP - P dP)
// is zero only if they rebuild P = 1 bit for bit.
cudaError_t scaled_dot_product_attention_bwd(const SdpaParams& params, cudaStream_t stream);

}  // namespace pyvit
