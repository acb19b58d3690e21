// Binding of window_attention (see bindings.h): validation, device guard, stream, launch.
#include "bindings.h"

#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <tuple>

#include "window_attention.cuh"

namespace window_attention_bind {

using namespace pyvit_bind;

// The largest element offset inside one image must fit the kernels' int32 arithmetic.
void check_int32_tokens(const char* op, const char* name, const at::Tensor& t) {
  int64_t extent = 0;
  for (int d = 1; d < 5; ++d) extent += (t.size(d) - 1) * t.stride(d);
  TORCH_CHECK_VALUE(extent <= INT_MAX, op, ": ", name, " of shape ", t.sizes(), " and strides ",
                    t.strides(), " is too large: the kernels index one image in 32 bits");
}

void check_tokens(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_like(op, name, t, 5, "q", q);
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ",
                    q.sizes(), ", got ", t.sizes());
  check_int32_tokens(op, name, t);
}

pyvit::WindowAttentionTokens tokens(const at::Tensor& t) {
  pyvit::WindowAttentionTokens view;
  view.data = t.const_data_ptr();
  for (int d = 0; d < 5; ++d) view.stride[d] = t.stride(d);
  return view;
}

// A small parameter (table, pad row) as contiguous fp32 on q's device, after checking it.
at::Tensor small_fp32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                      c10::IntArrayRef shape) {
  check_float_tensor(op, name, t, static_cast<int64_t>(shape.size()));
  check_same_device(op, name, t, "q", q);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  return t.to(at::kFloat).contiguous();
}

// Checked geometry and small parameters of one call, shared by the forward and backward.
struct Call {
  pyvit::WindowAttentionParams p;
  at::Tensor table, pad_k, pad_v, gain;  // fp32 copies (a few KB) the params point into
  int64_t num_windows = 0;
};

Call make_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& pad_k,
               const std::optional<at::Tensor>& pad_v, const std::optional<at::Tensor>& gain,
               int64_t window_h, int64_t window_w, int64_t shift_h, int64_t shift_w,
               double scale, double mask_value, bool grid_partition) {
  Call call;
  pyvit::WindowAttentionParams& p = call.p;
  p.dtype = check_float_tensor(op, "q", q, 5);
  check_int32_tokens(op, "q", q);
  check_tokens(op, "k", k, q);
  check_tokens(op, "v", v, q);
  const auto s = q.sizes();
  TORCH_CHECK_VALUE(s[0] <= INT_MAX && s[1] <= INT_MAX && s[2] <= INT_MAX && s[3] <= INT_MAX &&
                        s[4] <= INT_MAX && s[1] * s[2] * s[3] * s[4] <= INT_MAX,
                    op, ": q of shape ", s,
                    " is too large: the kernels index one output image (H*W*heads*D elements) "
                    "in 32 bits");
  p.B = static_cast<int>(s[0]);
  p.H = static_cast<int>(s[1]);
  p.W = static_cast<int>(s[2]);
  p.heads = static_cast<int>(s[3]);
  p.D = static_cast<int>(s[4]);
  TORCH_CHECK_VALUE(window_h >= 1 && window_w >= 1 && window_h <= p.H && window_w <= p.W, op,
                    ": window_size must be positive and at most the grid (H, W) = (", p.H, ", ",
                    p.W, "), got (", window_h, ", ", window_w, ")");
  TORCH_CHECK_VALUE(window_h * window_w <= pyvit::kWindowAttentionMaxArea, op,
                    ": the CUDA kernels take windows of at most ",
                    pyvit::kWindowAttentionMaxArea, " tokens, got ", window_h, "x", window_w,
                    " = ", window_h * window_w);
  TORCH_CHECK_VALUE(shift_h >= 0 && shift_w >= 0 && shift_h < window_h && shift_w < window_w, op,
                    ": shift_size must satisfy 0 <= shift < window_size (", window_h, ", ",
                    window_w, ") per axis, got (", shift_h, ", ", shift_w, ")");
  TORCH_CHECK_VALUE(!grid_partition || (p.H % window_h == 0 && p.W % window_w == 0 &&
                                         shift_h == 0 && shift_w == 0),
                    op, ": grid_partition needs H, W multiples of the window (", window_h, ", ",
                    window_w, ") and no shift, got (H, W) = (", p.H, ", ", p.W, "), shift (",
                    shift_h, ", ", shift_w, ")");
  p.grid_partition = grid_partition;
  p.wh = static_cast<int>(window_h);
  p.ww = static_cast<int>(window_w);
  p.sh = static_cast<int>(shift_h);
  p.sw = static_cast<int>(shift_w);
  call.num_windows = s[0] * ((p.H + p.wh - 1) / p.wh) * ((p.W + p.ww - 1) / p.ww);
  TORCH_CHECK_VALUE(call.num_windows * p.heads <= INT_MAX, op, ": q of shape ", s, " with window (",
                    p.wh, ", ", p.ww, ") has more than 2^31 - 1 (window, head) pairs");
  p.scale = static_cast<float>(scale);
  p.mask_value = static_cast<float>(mask_value);
  if (table.has_value()) {
    const int64_t rows = (2 * window_h - 1) * (2 * window_w - 1);
    call.table = small_fp32(op, "table", *table, q, {rows, s[3]});
    p.table = call.table.const_data_ptr<float>();
  }
  TORCH_CHECK_VALUE(pad_k.has_value() == pad_v.has_value(), op,
                    ": pad_k and pad_v must both be given or both be None");
  if (pad_k.has_value()) {
    // Rounded to q's dtype: what the projection of timm's zero padding produces.
    const auto rounded = [&](const char* name, const at::Tensor& pad) {
      return small_fp32(op, name, pad, q, {s[3], s[4]}).to(q.scalar_type()).to(at::kFloat);
    };
    call.pad_k = rounded("pad_k", *pad_k);
    call.pad_v = rounded("pad_v", *pad_v);
    p.pad_k = call.pad_k.const_data_ptr<float>();
    p.pad_v = call.pad_v.const_data_ptr<float>();
  }
  if (gain.has_value()) {
    call.gain = small_fp32(op, "gain", *gain, q, {s[3]});
    p.gain = call.gain.const_data_ptr<float>();
  }
  p.q = tokens(q);
  p.k = tokens(k);
  p.v = tokens(v);
  return call;
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& pad_k,
    const std::optional<at::Tensor>& pad_v, const std::optional<at::Tensor>& gain,
    int64_t window_h, int64_t window_w, int64_t shift_h, int64_t shift_w, double scale,
    double mask_value, bool grid_partition) {
  constexpr const char* op = "window_attention_fwd";
  Call call = make_call(op, q, k, v, table, pad_k, pad_v, gain, window_h, window_w, shift_h,
                        shift_w, scale, mask_value, grid_partition);
  pyvit::WindowAttentionParams& p = call.p;
  at::Tensor out = at::empty(q.sizes(), q.options());
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  // Per score row: its max and log2 of its sum (window_attention.cuh).
  at::Tensor lse = at::empty({call.num_windows, p.heads, p.wh * p.ww, 2}, fp32);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const DeviceContext context(q);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  check_launch(pyvit::window_attention_fwd(p, context.stream()), op);
  return {out, lse};
}

// Cosine attention: the gradient of the rows x from that of x_hat = x / n, n = max(|x|, eps)
// (F.normalize): (dx_hat - x_hat (x_hat . dx_hat)) / n, without the projection where
// |x| <= eps (n is then constant). In float64: a few (heads, D) rows.
at::Tensor through_normalisation(const at::Tensor& dx_hat, const at::Tensor& x) {
  constexpr double eps = 1e-12;
  const at::Tensor x64 = x.to(at::kDouble), dx_hat64 = dx_hat.to(at::kDouble);
  const at::Tensor norm = x64.norm(2, {-1}, /*keepdim=*/true);
  const at::Tensor n = norm.clamp_min(eps), x_hat = x64.div(n);
  const at::Tensor proj = x_hat.mul(dx_hat64).sum(-1, /*keepdim=*/true).mul(norm.gt(eps));
  return dx_hat64.sub(x_hat.mul(proj)).div(n);
}

// The parameter gradients (dtable, dpad_k, dpad_v, dlog_gain) of one backward; empty
// tensors for those not wanted.
using ParamGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward into dq, dk, dv: (B, H, W, heads, D) with dense rows, tokens
// dq.stride(2) apart (fresh tensors, or the slices of one packed gradient).
ParamGrads backward(const char* op, const at::Tensor& dout, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, const std::optional<at::Tensor>& table,
                    const std::optional<at::Tensor>& pad_k,
                    const std::optional<at::Tensor>& pad_v,
                    const std::optional<at::Tensor>& gain, int64_t window_h, int64_t window_w,
                    int64_t shift_h, int64_t shift_w, double scale, double mask_value,
                    bool grid_partition, bool table_grad, bool pad_grad, bool gain_grad,
                    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Call call = make_call(op, q, k, v, table, pad_k, pad_v, gain, window_h, window_w, shift_h,
                        shift_w, scale, mask_value, grid_partition);
  pyvit::WindowAttentionParams& p = call.p;
  check_tokens(op, "dout", dout, q);
  // Part of the op's contract (the Triton backward reads it); these kernels need only lse.
  check_tokens(op, "out", out, q);
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ",
                   lse.scalar_type());
  check_same_device(op, "lse", lse, "q", q);
  const std::array<int64_t, 4> lse_shape = {call.num_windows, p.heads, p.wh * p.ww, 2};
  TORCH_CHECK_VALUE(lse.sizes() == c10::IntArrayRef(lse_shape), op, ": lse must have shape ",
                    c10::IntArrayRef(lse_shape), ", got ", lse.sizes());
  TORCH_CHECK_VALUE(dq.size(1) * dq.size(2) * dq.stride(2) <= INT_MAX, op,
                    ": the gradient of shape ", dq.sizes(), " and strides ", dq.strides(),
                    " is too large: the kernels index one image in 32 bits");
  const at::Tensor lse_c = lse.contiguous();
  p.dout = tokens(dout);
  p.lse_in = lse_c.const_data_ptr<float>();
  p.table_grad = table_grad && table.has_value();
  p.pad_grad = pad_grad && pad_k.has_value();
  p.gain_grad = gain_grad && gain.has_value();

  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  at::Tensor dtable = at::empty({p.table_grad ? call.table.numel() : 0}, fp32);
  at::Tensor dpad = at::empty({p.pad_grad ? 2 * q.size(3) * q.size(4) : 0}, fp32);
  at::Tensor dlog_gain = at::empty({p.gain_grad ? q.size(3) : 0}, fp32);
  at::Tensor workspace = at::empty({pyvit::window_attention_bwd_workspace_floats(p)}, fp32);
  const DeviceContext context(q);
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.grad_token_stride = static_cast<int>(dq.stride(2));
  p.dtable = dtable.mutable_data_ptr<float>();
  p.dpad = dpad.mutable_data_ptr<float>();
  p.dlog_gain = dlog_gain.mutable_data_ptr<float>();
  p.workspace = workspace.mutable_data_ptr<float>();
  check_launch(pyvit::window_attention_bwd(p, context.stream()), op);

  // Custom-op returns may not alias one another: fresh empties, copies of the dpad halves.
  const auto none = [&] { return at::empty({0}, q.options()); };
  at::Tensor dpad_k = none(), dpad_v = none();
  if (p.pad_grad) {
    dpad = dpad.view({2, q.size(3), q.size(4)});
    if (p.gain != nullptr) dpad[0].copy_(through_normalisation(dpad[0], call.pad_k));
    dpad_k = dpad[0].to(pad_k->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    dpad_v = dpad[1].to(pad_v->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  return {p.table_grad ? dtable.view(call.table.sizes()).to(table->scalar_type()) : none(),
          dpad_k, dpad_v, p.gain_grad ? dlog_gain : none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& pad_k,
                     const std::optional<at::Tensor>& pad_v, const std::optional<at::Tensor>& gain,
                     int64_t window_h, int64_t window_w, int64_t shift_h, int64_t shift_w,
                     double scale, double mask_value, bool grid_partition, bool table_grad,
                     bool pad_grad, bool gain_grad) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  auto [dtable, dpad_k, dpad_v, dlog_gain] =
      backward("window_attention_bwd", dout, q, k, v, out, lse, table, pad_k, pad_v, gain,
               window_h, window_w, shift_h, shift_w, scale, mask_value, grid_partition,
               table_grad, pad_grad, gain_grad, dq, dk, dv);
  return {dq, dk, dv, dtable, dpad_k, dpad_v, dlog_gain};
}

// The backward of the three slices of qkv (B, H, W, 3, heads, D): one packed gradient,
// written in place, where autograd would otherwise stack dq, dk, dv.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_qkvpacked_bwd(const at::Tensor& dout, const at::Tensor& qkv,
                               const at::Tensor& out, const at::Tensor& lse,
                               const std::optional<at::Tensor>& table,
                               const std::optional<at::Tensor>& pad_k,
                               const std::optional<at::Tensor>& pad_v,
                               const std::optional<at::Tensor>& gain, int64_t window_h,
                               int64_t window_w, int64_t shift_h, int64_t shift_w, double scale,
                               double mask_value, bool grid_partition, bool table_grad,
                               bool pad_grad, bool gain_grad) {
  constexpr const char* op = "window_attention_qkvpacked_bwd";
  TORCH_CHECK_VALUE(qkv.dim() == 6 && qkv.size(3) == 3, op,
                    ": qkv must have shape (B, H, W, 3, heads, D), got ", qkv.sizes());
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  auto [dtable, dpad_k, dpad_v, dlog_gain] =
      backward(op, dout, qkv.select(3, 0), qkv.select(3, 1), qkv.select(3, 2), out, lse, table,
               pad_k, pad_v, gain, window_h, window_w, shift_h, shift_w, scale, mask_value,
               grid_partition, table_grad, pad_grad, gain_grad, dqkv.select(3, 0),
               dqkv.select(3, 1), dqkv.select(3, 2));
  return {dqkv, dtable, dpad_k, dpad_v, dlog_gain};
}

// The largest window make_call takes, for the Python layer to ask before launching.
int64_t window_area_limit() { return pyvit::kWindowAttentionMaxArea; }

}  // namespace window_attention_bind

PV_TORCH_LIBRARY_FRAGMENT(PV_OPS_NAMESPACE, m) {
  m.def(
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? pad_k, "
      "Tensor? pad_v, Tensor? gain, int window_h, int window_w, int shift_h, int shift_w, "
      "float scale, float mask_value, bool grid_partition) -> (Tensor, Tensor)");
  m.def(
      "window_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? table, Tensor? pad_k, Tensor? pad_v, Tensor? gain, int window_h, int window_w, "
      "int shift_h, int shift_w, float scale, float mask_value, bool grid_partition, "
      "bool table_grad, bool pad_grad, bool gain_grad) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "window_attention_qkvpacked_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, "
      "Tensor? table, Tensor? pad_k, Tensor? pad_v, Tensor? gain, int window_h, int window_w, "
      "int shift_h, int shift_w, float scale, float mask_value, bool grid_partition, "
      "bool table_grad, bool pad_grad, bool gain_grad) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def("window_attention_window_area_limit() -> int",
        &window_attention_bind::window_area_limit);
}

PV_TORCH_LIBRARY_IMPL(PV_OPS_NAMESPACE, PV_DISPATCH_KEY, m) {
  m.impl("window_attention_fwd", &window_attention_bind::window_attention_fwd);
  m.impl("window_attention_bwd", &window_attention_bind::window_attention_bwd);
  m.impl("window_attention_qkvpacked_bwd", &window_attention_bind::window_attention_qkvpacked_bwd);
}
