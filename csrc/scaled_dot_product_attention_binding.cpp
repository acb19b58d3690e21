// Binding of scaled_dot_product_attention (see bindings.h): validation, device guard,
// stream, launch. Takes the ops layer's folded (Z1, Z2, N, D) views, like the Triton
// launchers in kernels/scaled_dot_product_attention.py.
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "scaled_dot_product_attention.cuh"

namespace sdpa_bind {

using namespace pyvit_bind;

// Most (batch, query or key) rows of one call: the kernels index their grid in 32 bits.
constexpr int64_t kMaxBatchTokens = INT_MAX;

void copy_strides(std::int64_t (&dst)[4], const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

// Shapes, dtypes, bias and dropout shared by the forward and backward; rel_pos_grid
// (gh, gw): the bias is a relative-position table view (scaled_dot_product_attention.cuh).
pyvit::SdpaParams sdpa_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const std::optional<at::Tensor>& bias,
                              double scale, double dropout_p,
                              const std::optional<at::Tensor>& seed,
                              c10::IntArrayRef rel_pos_grid) {
  pyvit::SdpaParams p;
  p.dtype = check_float_tensor(op, "q", q, 4);
  TORCH_CHECK_TYPE(check_float_tensor(op, "k", k, 4) == p.dtype &&
                       check_float_tensor(op, "v", v, 4) == p.dtype,
                   op, ": k and v must have the dtype of q (", q.scalar_type(), "), got ",
                   k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": q, k, v must be on one device, got ", q.device(), ", ", k.device(),
                    ", ", v.device());
  const int64_t Z1 = q.size(0), Z2 = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == c10::IntArrayRef({Z1, Z2, Nk, D}) && v.sizes() == k.sizes(),
                    op, ": k and v must have shape [", Z1, ", ", Z2, ", Nk, ", D, "], got ",
                    k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(D >= 1 && D <= pyvit::kSdpaMaxHeadDim, op, ": head dim must be in [1, ",
                    pyvit::kSdpaMaxHeadDim, "], got ", D);
  TORCH_CHECK_VALUE(Z1 <= INT_MAX && Z2 <= INT_MAX && Nq <= INT_MAX && Nk <= INT_MAX &&
                        Z1 * Z2 * std::max<int64_t>(Nq, Nk) <= kMaxBatchTokens,
                    op, ": q of shape ", q.sizes(), " and k of shape ", k.sizes(),
                    " are too large (the grid is indexed in 32 bits)");
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, op,
                    ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK_VALUE(dropout_p == 0.0 || Nq * Nk < (int64_t{1} << 31), op,
                    ": dropout needs Nq * Nk < 2**31, got ", Nq, " * ", Nk);
  p.Z1 = static_cast<int>(Z1), p.Z2 = static_cast<int>(Z2);
  p.Nq = static_cast<int>(Nq), p.Nk = static_cast<int>(Nk), p.D = static_cast<int>(D);
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  copy_strides(p.q_stride, q), copy_strides(p.k_stride, k), copy_strides(p.v_stride, v);
  TORCH_CHECK_VALUE(rel_pos_grid.empty() || (rel_pos_grid.size() == 2 && bias.has_value()),
                    op, ": rel_pos_grid must be empty or (gh, gw) with a table, got ",
                    rel_pos_grid);
  if (!rel_pos_grid.empty()) {
    const int64_t gh = rel_pos_grid[0], gw = rel_pos_grid[1], lead = Nq - gh * gw;
    const int64_t rows = (2 * gh - 1) * (2 * gw - 1) + 3 * lead;
    TORCH_CHECK_VALUE(gh >= 1 && gw >= 1 && (lead == 0 || lead == 1) && Nk == Nq &&
                          bias->sizes() == c10::IntArrayRef({Z1, Z2, 1, rows}) &&
                          bias->scalar_type() != at::kBool,
                      op, ": a relative-position table for Nq = Nk = ", gh, " * ", gw,
                      " (+ 1 class token) must be a float [", Z1, ", ", Z2, ", 1, T] view, got Nq ",
                      Nq, ", Nk ", Nk, ", table ", bias->sizes());
    TORCH_CHECK_VALUE(gh * gw * gw < (int64_t{1} << 32), op, ": a ", gh, " x ", gw,
                      " relative-position grid needs gh * gw * gw < 2**32");
    pyvit::SdpaRelPos& g = p.rel_pos;
    g.gh = static_cast<int>(gh), g.gw = static_cast<int>(gw), g.lead = static_cast<int>(lead);
    g.tokens = static_cast<unsigned>(gh * gw);
    g.offsets = static_cast<unsigned>((2 * gh - 1) * (2 * gw - 1));
    g.center = (g.offsets - 1) / 2;
    g.div = static_cast<std::uint32_t>((int64_t{1} << 32) / std::max<int64_t>(gw, 2) + 1);
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_same_device(op, "bias", b, "q", q);
    TORCH_CHECK_VALUE(!rel_pos_grid.empty() || b.sizes() == c10::IntArrayRef({Z1, Z2, Nq, Nk}),
                      op, ": bias must be a [", Z1, ", ", Z2, ", ", Nq, ", ", Nk,
                      "] view (broadcast dims with stride 0), got ", b.sizes());
    if (b.scalar_type() == at::kBool) {
      p.bias_kind = pyvit::SdpaBias::kBool;
    } else if (b.scalar_type() == at::kFloat) {
      p.bias_kind = pyvit::SdpaBias::kFloat32;
    } else {
      TORCH_CHECK_TYPE(b.scalar_type() == q.scalar_type(), op,
                       ": bias must be bool, float32 or the dtype of q (", q.scalar_type(),
                       "), got ", b.scalar_type());
      p.bias_kind = pyvit::SdpaBias::kSameAsQ;
    }
    p.bias = b.const_data_ptr();
    copy_strides(p.b_stride, b);
  }
  p.scale = static_cast<float>(scale);
  p.dropout = dropout_p > 0.0;
  // As the Triton kernels: threshold p * 2^32 in fp32, capped below 2^32.
  const float threshold = std::min(static_cast<float>(dropout_p) * 4294967296.0f, 4294967040.0f);
  p.dropout_threshold = static_cast<std::uint32_t>(threshold);
  p.dropout_scale = dropout_p >= 1.0 ? 0.f : static_cast<float>(1.0 / (1.0 - dropout_p));
  if (p.dropout) {
    // The kernels read the seed in device memory: the host never reads it (no sync).
    TORCH_CHECK_VALUE(seed.has_value(), op,
                      ": seed: expected a one-element int64 tensor with dropout, got None");
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                      ": seed: expected a one-element int64 tensor, got ", seed->scalar_type(),
                      " of shape ", seed->sizes());
    check_same_device(op, "seed", *seed, "q", q);
    p.seed = seed->const_data_ptr<int64_t>();
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> sdpa_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& bias, double scale,
                                            double dropout_p,
                                            const std::optional<at::Tensor>& seed,
                                            at::OptionalIntArrayRef rel_pos_grid) {
  constexpr const char* op = "scaled_dot_product_attention_fwd";
  pyvit::SdpaParams p = sdpa_params(op, q, k, v, bias, scale, dropout_p, seed,
                                    rel_pos_grid.value_or(c10::IntArrayRef{}));
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  // Per row: the max logit and log2 of the sum of exponentials.
  at::Tensor lse = at::empty({p.Z1, p.Z2, p.Nq, 2}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const DeviceContext context(q);
  p.out_w = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  check_launch(pyvit::scaled_dot_product_attention_fwd(p, context.stream()), op);
  return {out, lse};
}

// The backward into dq, dk, dv (the shapes of q, k, v, any strides: fresh tensors, or
// the slices of one packed qkv gradient); returns dbias.
at::Tensor backward(const char* op, const at::Tensor& dout, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                    const std::optional<at::Tensor>& bias, double scale, double dropout_p,
                    const std::optional<at::Tensor>& seed, bool bias_requires_grad,
                    c10::IntArrayRef rel_pos_grid, at::Tensor& dq, at::Tensor& dk,
                    at::Tensor& dv) {
  pyvit::SdpaParams p = sdpa_params(op, q, k, v, bias, scale, dropout_p, seed, rel_pos_grid);
  check_like(op, "dout", dout, 4, "q", q);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), op, ": dout must have the shape of q ",
                    q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                        lse.sizes() == c10::IntArrayRef({p.Z1, p.Z2, p.Nq, 2}) &&
                        lse.device() == q.device(),
                    op, ": lse must be a contiguous float32 [", p.Z1, ", ", p.Z2, ", ", p.Nq,
                    ", 2] tensor on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes(),
                    " strides ", lse.strides(), " on ", lse.device());
  TORCH_CHECK_VALUE(!bias_requires_grad || (bias.has_value() && bias->scalar_type() != at::kBool),
                    op, ": bias_requires_grad needs a float bias");
  for (const auto& [name, g, like] :
       {std::tuple<const char*, const at::Tensor&, const at::Tensor&>{"dq", dq, q},
        std::tuple<const char*, const at::Tensor&, const at::Tensor&>{"dk", dk, k},
        std::tuple<const char*, const at::Tensor&, const at::Tensor&>{"dv", dv, v}}) {
    check_like(op, name, g, 4, "q", q);
    TORCH_CHECK_VALUE(g.sizes() == like.sizes(), op, ": ", name, " must have shape ",
                      like.sizes(), ", got ", g.sizes());
  }
  at::Tensor dbias = at::empty({0}, q.options());
  at::Tensor scratch;  // a table's dS sums, (reduced Z1, reduced Z2, Nq, Nk) fp32
  const bool empty = dq.numel() == 0 || dk.numel() == 0;
  const bool table = !rel_pos_grid.empty();
  if (bias_requires_grad) {
    // The bias view's shape with each broadcast dim (stride 0, size > 1) reduced to 1.
    std::vector<int64_t> reduced(4);
    for (int d = 0; d < 4; ++d) {
      reduced[d] = bias->stride(d) == 0 && bias->size(d) > 1 ? 1 : bias->size(d);
    }
    // A bias constant along the keys (or a single key) has a zero gradient (softmax is
    // shift-invariant).
    const bool zero = empty || (p.b_stride[3] == 0 && !table) || p.Nk == 1;
    dbias = zero ? at::zeros(reduced, bias->options()) : at::empty(reduced, bias->options());
    if (!zero && table) {
      p.dtable = dbias.mutable_data_ptr();
      p.dtable_f32 = dbias.scalar_type() == at::kFloat;
      p.dtable_rows = static_cast<int>(reduced[3]);
      for (int d = 0; d < 2; ++d) p.dt_stride[d] = reduced[d] == 1 ? 0 : dbias.stride(d);
      scratch = at::empty({reduced[0], reduced[1], p.Nq, p.Nk}, q.options().dtype(at::kFloat));
      p.dbias = scratch.mutable_data_ptr();
      p.dbias_f32 = true;
      for (int d = 0; d < 4; ++d) p.db_stride[d] = scratch.size(d) == 1 ? 0 : scratch.stride(d);
    } else if (!zero) {
      p.dbias = dbias.mutable_data_ptr();
      p.dbias_f32 = dbias.scalar_type() == at::kFloat;
      for (int d = 0; d < 4; ++d) p.db_stride[d] = reduced[d] == 1 ? 0 : dbias.stride(d);
    }
  }
  if (empty) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return dbias;
  }
  at::Tensor delta = at::empty({p.Z1, p.Z2, p.Nq}, lse.options());
  const DeviceContext context(q);
  p.dout = dout.const_data_ptr();
  copy_strides(p.do_stride, dout);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = dq.mutable_data_ptr(), p.dk = dk.mutable_data_ptr(), p.dv = dv.mutable_data_ptr();
  copy_strides(p.dq_stride, dq), copy_strides(p.dk_stride, dk), copy_strides(p.dv_stride, dv);
  check_launch(pyvit::scaled_dot_product_attention_bwd(p, context.stream()), op);
  if (p.Nk == 1) {
    // One key: softmax is constant, so q and k get an exactly zero gradient (the dS
    // the kernels would recompute is rounding noise).
    dq.zero_(), dk.zero_();
  }
  return dbias;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, double scale,
    double dropout_p, const std::optional<at::Tensor>& seed, bool bias_requires_grad,
    at::OptionalIntArrayRef rel_pos_grid) {
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous);
  at::Tensor dk = at::empty(k.sizes(), contiguous);
  at::Tensor dv = at::empty(v.sizes(), contiguous);
  at::Tensor dbias = backward("scaled_dot_product_attention_bwd", dout, q, k, v, lse, bias,
                              scale, dropout_p, seed, bias_requires_grad,
                              rel_pos_grid.value_or(c10::IntArrayRef{}), dq, dk, dv);
  return {dq, dk, dv, dbias};
}

at::Tensor sdpa_bwd_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& lse,
                         const std::optional<at::Tensor>& bias, double scale, double dropout_p,
                         const std::optional<at::Tensor>& seed, bool bias_requires_grad,
                         at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                         at::OptionalIntArrayRef rel_pos_grid) {
  return backward("scaled_dot_product_attention_bwd_into", dout, q, k, v, lse, bias, scale,
                  dropout_p, seed, bias_requires_grad, rel_pos_grid.value_or(c10::IntArrayRef{}),
                  dq, dk, dv);
}

// The limits above, for the Python layer to ask before launching (pyvit_ops.capabilities).
int64_t head_dim_limit() { return pyvit::kSdpaMaxHeadDim; }
int64_t batch_tokens_limit() { return kMaxBatchTokens; }

}  // namespace sdpa_bind

PV_TORCH_LIBRARY_FRAGMENT(PV_OPS_NAMESPACE, m) {
  m.def(
      "scaled_dot_product_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, "
      "float scale, float dropout_p, Tensor? seed, int[]? rel_pos_grid=None) -> "
      "(Tensor, Tensor)");
  m.def(
      "scaled_dot_product_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "Tensor? bias, float scale, float dropout_p, Tensor? seed, "
      "bool bias_requires_grad, int[]? rel_pos_grid=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "scaled_dot_product_attention_bwd_into(Tensor dout, Tensor q, Tensor k, Tensor v, "
      "Tensor lse, Tensor? bias, float scale, float dropout_p, Tensor? seed, "
      "bool bias_requires_grad, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
      "int[]? rel_pos_grid=None) -> Tensor");
  m.def("scaled_dot_product_attention_head_dim_limit() -> int", &sdpa_bind::head_dim_limit);
  m.def("scaled_dot_product_attention_batch_tokens_limit() -> int",
        &sdpa_bind::batch_tokens_limit);
}

PV_TORCH_LIBRARY_IMPL(PV_OPS_NAMESPACE, PV_DISPATCH_KEY, m) {
  m.impl("scaled_dot_product_attention_fwd", &sdpa_bind::sdpa_fwd);
  m.impl("scaled_dot_product_attention_bwd", &sdpa_bind::sdpa_bwd);
  m.impl("scaled_dot_product_attention_bwd_into", &sdpa_bind::sdpa_bwd_into);
}
