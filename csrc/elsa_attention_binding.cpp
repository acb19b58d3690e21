// Binding of elsa_attention (see bindings.h): validation, the ghost table, device guard,
// outputs and workspace, launch.
#include "bindings.h"

#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "elsa_attention.cuh"

namespace elsa_attention_bind {

using namespace pyvit_bind;

// Channels are the contiguous axis: the rule of the Python layer's output_memory_format,
// which also decides the memory format of outputs and gradients.
bool is_channels_last(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) == 1 && t.stride(3) != 1;
}

at::MemoryFormat output_format(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::Tensor empty_like_format(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(output_format(t)));
}

// The kernels offset within one sample in 32 bits.
void check_sample_span(const char* op, const char* name, const at::Tensor& t) {
  int64_t span = 0;
  for (int d = 1; d < 4; ++d) span += (t.size(d) - 1) * t.stride(d);
  TORCH_CHECK_VALUE(span <= INT_MAX, op, ": ", name, " of shape ", t.sizes(), " and strides ",
                    t.strides(), " is too large: offsets within one sample must fit in 32 bits");
}

pyvit::ElsaTensor tensor_arg(const at::Tensor& t, const void* data) {
  pyvit::ElsaTensor arg;
  arg.data = data;
  for (int d = 0; d < 4; ++d) arg.stride[d] = t.stride(d);
  arg.channels_last = is_channels_last(t);
  return arg;
}

void check_ghost(const char* op, const char* name, const std::optional<at::Tensor>& ghost,
                 const at::Tensor& v, int64_t K) {
  if (!ghost) return;
  check_float_tensor(op, name, *ghost, 3);  // any float dtype: fp32 parameters under AMP
  check_same_device(op, name, *ghost, "v", v);
  TORCH_CHECK_VALUE(ghost->sizes() == c10::IntArrayRef({v.size(1), K, K}), op, ": ", name,
                    " must have shape [", v.size(1), ", ", K, ", ", K, "], got ", ghost->sizes());
}

// (C, K*K, 2) float32 (M, D) pairs, ones / zeros for the missing tensor; undefined when
// neither is given. C*K*K*2 floats: the ghost tensors are never expanded per sample.
at::Tensor ghost_table(const std::optional<at::Tensor>& ghost_mul,
                       const std::optional<at::Tensor>& ghost_add, const at::Tensor& v,
                       int64_t taps) {
  if (!ghost_mul && !ghost_add) return {};
  const int64_t C = v.size(1);
  const auto options = v.options().dtype(at::kFloat);
  const at::Tensor m =
      ghost_mul ? ghost_mul->reshape({C, taps}).to(at::kFloat) : at::ones({C, taps}, options);
  const at::Tensor d =
      ghost_add ? ghost_add->reshape({C, taps}).to(at::kFloat) : at::zeros({C, taps}, options);
  return at::stack({m, d}, 2);
}

// Validates the inputs shared by the forward and the backward and fills the parameters
// they describe (pointers, strides, sizes); `ghost` keeps the table alive.
pyvit::ElsaAttentionParams make_params(const char* op, const at::Tensor& v, const at::Tensor& attn,
                                       const std::optional<at::Tensor>& ghost_mul,
                                       const std::optional<at::Tensor>& ghost_add,
                                       int64_t kernel_size, int64_t dilation, bool apply_softmax,
                                       at::Tensor& ghost, std::size_t smem_budget = 0) {
  pyvit::ElsaAttentionParams p;
  p.smem_budget = smem_budget;
  p.dtype = check_float_tensor(op, "v", v, 4);
  check_like(op, "attn", attn, 4, "v", v);
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1, op,
                    ": kernel_size must be a positive odd int, got ", kernel_size);
  TORCH_CHECK_VALUE(dilation >= 1 && dilation <= INT_MAX, op,
                    ": dilation must be a positive int, got ", dilation);
  const int64_t taps = kernel_size * kernel_size;
  TORCH_CHECK_VALUE(attn.size(1) > 0 && attn.size(1) % taps == 0, op,
                    ": attn must have G * kernel_size**2 = G * ", taps,
                    " channels (G heads), got shape ", attn.sizes());
  const int64_t G = attn.size(1) / taps;
  TORCH_CHECK_VALUE(attn.size(0) == v.size(0) && attn.size(2) == v.size(2) &&
                        attn.size(3) == v.size(3),
                    op, ": attn must have the batch and spatial sizes of v ", v.sizes(), ", got ",
                    attn.sizes());
  TORCH_CHECK_VALUE(v.size(1) % G == 0, op, ": v must have a channel count divisible by the ",
                    G, " heads of attn, got shape ", v.sizes());
  check_ghost(op, "ghost_mul", ghost_mul, v, kernel_size);
  check_ghost(op, "ghost_add", ghost_add, v, kernel_size);
  check_sample_span(op, "v", v);
  check_sample_span(op, "attn", attn);
  TORCH_CHECK_VALUE(v.size(0) <= INT_MAX && v.size(1) * taps <= INT_MAX, op, ": v of shape ",
                    v.sizes(), " is too large");

  p.B = static_cast<int>(v.size(0));
  p.C = static_cast<int>(v.size(1));
  p.G = static_cast<int>(G);
  p.H = static_cast<int>(v.size(2));
  p.W = static_cast<int>(v.size(3));
  p.K = static_cast<int>(kernel_size);
  p.dilation = static_cast<int>(dilation);
  p.apply_softmax = apply_softmax;
  const char* unsupported = pyvit::elsa_attention_unsupported(p);
  TORCH_CHECK_VALUE(unsupported == nullptr, op, ": ", unsupported, " (kernel_size ", kernel_size,
                    ", dilation ", dilation, ", ", v.size(1) / G, " channels per head)");

  p.v = tensor_arg(v, v.const_data_ptr());
  p.attn = tensor_arg(attn, attn.const_data_ptr());
  ghost = ghost_table(ghost_mul, ghost_add, v, taps);
  p.ghost = ghost.defined() ? ghost.const_data_ptr<float>() : nullptr;
  p.has_mul = ghost_mul.has_value();
  return p;
}

at::Tensor elsa_attention_fwd(const at::Tensor& v, const at::Tensor& attn,
                              const std::optional<at::Tensor>& ghost_mul,
                              const std::optional<at::Tensor>& ghost_add, int64_t kernel_size,
                              int64_t dilation, bool apply_softmax) {
  constexpr const char* op = "elsa_attention_fwd";
  const DeviceContext context(v);
  at::Tensor ghost;
  pyvit::ElsaAttentionParams p = make_params(op, v, attn, ghost_mul, ghost_add, kernel_size,
                                             dilation, apply_softmax, ghost);
  at::Tensor out = empty_like_format(v);
  if (out.numel() == 0) return out;
  p.out = tensor_arg(out, out.mutable_data_ptr());
  check_launch(pyvit::elsa_attention_fwd(p, context.stream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> elsa_attention_bwd(
    const at::Tensor& dout, const at::Tensor& v, const at::Tensor& attn,
    const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
    int64_t kernel_size, int64_t dilation, bool apply_softmax,
    const c10::List<bool>& needs_input_grad) {
  constexpr const char* op = "elsa_attention_bwd";
  TORCH_CHECK_VALUE(needs_input_grad.size() == 4, op,
                    ": needs_input_grad must have 4 entries (v, attn, ghost_mul, ghost_add), got ",
                    needs_input_grad.size());
  const DeviceContext context(v);
  at::Tensor ghost;
  pyvit::ElsaAttentionParams p = make_params(op, v, attn, ghost_mul, ghost_add, kernel_size,
                                             dilation, apply_softmax, ghost);
  check_like(op, "dout", dout, 4, "v", v);
  TORCH_CHECK_VALUE(dout.sizes() == v.sizes(), op, ": dout must have the shape of v ", v.sizes(),
                    ", got ", dout.sizes());
  check_sample_span(op, "dout", dout);

  p.need_dv = needs_input_grad[0];
  p.need_dattn = needs_input_grad[1];
  p.need_dmul = needs_input_grad[2] && ghost_mul.has_value();
  p.need_dadd = needs_input_grad[3] && ghost_add.has_value();
  // Gradients not asked for are empty tensors (custom ops cannot return None), one each:
  // outputs must not alias.
  const auto none = [&] { return at::empty({0}, v.options()); };
  at::Tensor dv = p.need_dv ? empty_like_format(v) : none();
  at::Tensor dattn = p.need_dattn ? empty_like_format(attn) : none();
  at::Tensor dmul = p.need_dmul ? at::empty(ghost_mul->sizes(), ghost_mul->options()) : none();
  at::Tensor dadd = p.need_dadd ? at::empty(ghost_add->sizes(), ghost_add->options()) : none();
  if (v.numel() == 0 || attn.numel() == 0) {
    // Nothing to aggregate: the gradients that have elements are zero.
    for (at::Tensor* grad : {&dv, &dattn, &dmul, &dadd}) grad->zero_();
    return {dv, dattn, dmul, dadd};
  }
  p.dout = tensor_arg(dout, dout.const_data_ptr());
  if (p.need_dv) p.dv = tensor_arg(dv, dv.mutable_data_ptr());
  if (p.need_dattn) p.dattn = tensor_arg(dattn, dattn.mutable_data_ptr());
  if (p.need_dmul) {
    p.dghost_mul = dmul.mutable_data_ptr();
    p.dmul_dtype = check_float_tensor(op, "ghost_mul", *ghost_mul, 3);
  }
  if (p.need_dadd) {
    p.dghost_add = dadd.mutable_data_ptr();
    p.dadd_dtype = check_float_tensor(op, "ghost_add", *ghost_add, 3);
  }
  const std::size_t bytes = pyvit::elsa_attention_bwd_workspace_bytes(p);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, v.options().dtype(at::kByte));
  p.workspace = bytes ? workspace.mutable_data_ptr() : nullptr;
  check_launch(pyvit::elsa_attention_bwd(p, context.stream()), op);
  return {dv, dattn, dmul, dadd};
}

// Whether the kernels can run v and attn with these arguments, without launching: (the
// reason they cannot, as the launch would raise it, or ""; the plan as [tile_h, tile_w,
// chunk, tiles, aggregate_smem, attn_smem, samples_per_block], empty when there is none).
// smem_budget: bytes of shared memory per block (0: the device's); samples_per_block: per
// attn-gradient block with ghost gradients (-1: this build's default, 0: the GPU rule).
std::tuple<std::string, std::vector<int64_t>> elsa_attention_plan(
    const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size, int64_t dilation,
    bool ghost_grad, int64_t smem_budget, int64_t samples_per_block) {
  constexpr const char* op = "elsa_attention_plan";
  TORCH_CHECK_VALUE(smem_budget >= 0 && samples_per_block >= -1 && samples_per_block <= INT_MAX,
                    op, ": expected smem_budget >= 0 and samples_per_block >= -1, got ",
                    smem_budget, " and ", samples_per_block);
  at::Tensor ghost;
  pyvit::ElsaAttentionParams p;
  try {
    p = make_params(op, v, attn, std::nullopt, std::nullopt, kernel_size, dilation, true, ghost,
                    static_cast<std::size_t>(smem_budget));
  } catch (const c10::Error& error) {
    return {error.what_without_backtrace(), {}};
  }
  if (samples_per_block >= 0) p.samples_per_block = static_cast<int>(samples_per_block);
  p.need_dmul = ghost_grad;
  pyvit::ElsaPlanInfo info;
  if (!pyvit::elsa_attention_plan(p, info)) return {"", {}};
  return {"", {info.tile_h, info.tile_w, info.chunk, info.tiles,
               static_cast<int64_t>(info.aggregate_smem), static_cast<int64_t>(info.attn_smem),
               info.samples_per_block}};
}

// The largest kernel_size the kernels are compiled for (elsa_attention_unsupported), for
// the Python layer to ask before launching.
int64_t kernel_size_limit() { return pyvit::kElsaMaxKernelSize; }

}  // namespace elsa_attention_bind

PV_TORCH_LIBRARY_FRAGMENT(PV_OPS_NAMESPACE, m) {
  m.def(
      "elsa_attention_fwd(Tensor v, Tensor attn, Tensor? ghost_mul, Tensor? ghost_add, "
      "int kernel_size, int dilation, bool apply_softmax) -> Tensor");
  m.def(
      "elsa_attention_bwd(Tensor dout, Tensor v, Tensor attn, Tensor? ghost_mul, "
      "Tensor? ghost_add, int kernel_size, int dilation, bool apply_softmax, "
      "bool[] needs_input_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "elsa_attention_plan(Tensor v, Tensor attn, int kernel_size, int dilation, bool ghost_grad, "
      "int smem_budget, int samples_per_block) -> (str, int[])");
  m.def("elsa_attention_kernel_size_limit() -> int", &elsa_attention_bind::kernel_size_limit);
}

PV_TORCH_LIBRARY_IMPL(PV_OPS_NAMESPACE, PV_DISPATCH_KEY, m) {
  m.impl("elsa_attention_fwd", &elsa_attention_bind::elsa_attention_fwd);
  m.impl("elsa_attention_bwd", &elsa_attention_bind::elsa_attention_bwd);
  m.impl("elsa_attention_plan", &elsa_attention_bind::elsa_attention_plan);
}
