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
// With rel_pos.gh > 0 the float bias is timm's BEiT relative-position table (T, heads),
// seen as a (Z1, Z2, 1, T) view: b_stride[0..1] select the batch element's head,
// b_stride[3] steps between table rows, and logit (row, col) reads the row the kernels
// compute from rel_pos. Its gradient (dtable set) is the dS sum over the broadcast batch
// in the contiguous fp32 scratch dbias, (Z1 or 1, Z2 or 1, Nq, Nk) through db_stride,
// then gathered into dtable ((Z1 or 1, Z2 or 1, T), written through dt_stride; float32
// or q's dtype per dtable_f32).
struct SdpaRelPos {
  int gh = 0, gw = 0, lead = 0;  // the patch grid and the class tokens before it (0 or 1)
  // Derived by the caller, so that the kernels read them as constants: gh * gw; the
  // patch offsets' rows (2gh - 1)(2gw - 1), after which come the class token's three;
  // the row of offset (0, 0); floor(2^32 / gw) + 1 (any value for gw = 1), with which
  // t / gw is __umulhi(t, div) for every patch index t while gh * gw * gw < 2^32.
  unsigned tokens = 0, offsets = 0, center = 0;
  std::uint32_t div = 0;
};

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
  SdpaRelPos rel_pos;
  void* dtable = nullptr;
  std::int64_t dt_stride[2] = {};
  int dtable_rows = 0;
  bool dtable_f32 = false;
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
