"""``pyvit_ops.elsa_attention``: ELSA's local aggregation with the ghost head.

Backends: "reference" (``pyvit_ops.reference.elsa_attention``, differentiable
PyTorch), "triton" (``pyvit_ops.kernels.elsa_attention``) and "cuda" (the C++
extension's ``elsa_attention_fwd`` / ``_bwd``). The kernel backends go through the
custom ops ``pyvit_ops::elsa_attention_fwd`` / ``_bwd``; nothing but the inputs is
saved for the backward, which recomputes the softmax.
"""
import operator
from typing import List, Optional, Tuple

import torch

from pyvit_ops import _backend, _checks, _ext, capabilities
from pyvit_ops.kernels import _common
from pyvit_ops.reference import elsa_attention as reference
from pyvit_ops.reference.elsa_attention import output_memory_format

_OP = "elsa_attention"


# --------------------------------------------------------------------------- limits


def _triton_module():
    from pyvit_ops.kernels import elsa_attention as kernels

    return kernels


def smem_per_block(device):
    """Shared memory (bytes) a CUDA block may opt in to on ``device``; 0 for other devices
    (the host-emulation build plans with an A100's budget)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _reasons(backend, v, attn, ghost_mul, ghost_add, heads, kernel_size, dilation):
    tensors = [v, attn, ghost_mul, ghost_add]
    reasons = _backend.common_reasons(backend, _OP, tensors=tensors)
    channels = v.shape[1] // heads
    reasons += capabilities.limit_reasons(_OP, backend, "head_channels", channels,
                                          f"{channels} channels per head")
    reasons += capabilities.limit_reasons(_OP, backend, "kernel_size", kernel_size,
                                          f"kernel_size {kernel_size}")
    if backend == "triton":
        reasons += _triton_module().int32_reasons(v=v, attn=attn)
    if backend == "cuda" and not reasons:
        # The plan reads sizes only, through stride-0 proxies: their offset limit is
        # checked here, on the real strides (the binding's rule).
        reasons += _common.int32_reasons(v=v, attn=attn)
        # operator.index: concrete ints under torch.compile too (symbolic sizes and ints
        # are specialised and guarded), since the plan depends on every one of them.
        why = _cuda_plan_reason(v.device, v.dtype, tuple(operator.index(s) for s in v.shape),
                                tuple(operator.index(s) for s in attn.shape),
                                operator.index(kernel_size), operator.index(dilation))
        if why:
            reasons.append(why)
    return reasons


def _cuda_plan_reason(device, dtype, v_shape, attn_shape, kernel_size, dilation):
    """What the CUDA launch would refuse (the plan's shared memory on this device, grid
    limits), or "": asked of the extension before launching. A function of sizes and
    ints that torch.compile runs at trace time (the plan op has no fake implementation
    and returns no tensor), on stride-0 proxies of v and attn (one element each)."""
    v, attn = (torch.empty((), dtype=dtype, device=device).expand(shape)
               for shape in (v_shape, attn_shape))
    why, _ = _ext.lib(v).elsa_attention_plan(v, attn, kernel_size, dilation, False,
                                             smem_per_block(device), -1)
    return why


# torch.compiler.assume_constant_result(_cuda_plan_reason), minus the decorator's import
# of torch._dynamo (and with it triton.language, before the tests enable the interpreter)
# when pyvit_ops is imported: the mark is the attribute that decorator sets. The compile
# tests of the cuda backend fail if torch renames it.
_cuda_plan_reason._dynamo_marked_constant = True


# --------------------------------------------------------------------------- validation


def _check_args(v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax):
    _checks.check_tensor("v", v, ndim=4)
    _checks.check_tensor("attn", attn, ndim=4)
    _checks.check_same_dtype(v=v, attn=attn)
    _checks.check_int("kernel_size", kernel_size, 1, odd=True)
    _checks.check_int("dilation", dilation, 1)
    # The kernels take 32-bit ints.
    for name, value in (("kernel_size", kernel_size), ("dilation", dilation)):
        if value > capabilities.INT32_MAX:
            raise ValueError(f"{name}: expected an int <= 2**31 - 1, got {value}")
    if not isinstance(apply_softmax, bool):
        raise TypeError(f"apply_softmax: expected a bool, got {apply_softmax!r}")
    B, C, H, W = v.shape
    taps = kernel_size * kernel_size
    if attn.shape[1] == 0 or attn.shape[1] % taps:
        raise ValueError(f"attn: expected G * kernel_size**2 = G * {taps} channels (G heads), "
                         f"got shape {tuple(attn.shape)}")
    heads = attn.shape[1] // taps
    expected = (B, heads * taps, H, W)
    if tuple(attn.shape) != expected:
        raise ValueError(f"attn: expected shape {expected} to match v {tuple(v.shape)}, "
                         f"got {tuple(attn.shape)}")
    if C % heads:
        raise ValueError(f"v: expected a channel count divisible by the {heads} heads of attn "
                         f"(attn has {attn.shape[1]} = {heads} x {taps} channels), got "
                         f"shape {tuple(v.shape)}")
    allowed = tuple(dict.fromkeys((v.dtype, torch.float32)))
    for name, ghost in (("ghost_mul", ghost_mul), ("ghost_add", ghost_add)):
        if ghost is not None:
            _checks.check_tensor(name, ghost, ndim=3, dtypes=allowed)
            _checks.check_shape(name, ghost, (C, kernel_size, kernel_size))
    _checks.check_same_device(v=v, attn=attn, ghost_mul=ghost_mul, ghost_add=ghost_add)
    return heads


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("pyvit_ops::elsa_attention_fwd", mutates_args=())
def _elsa_attention_fwd(
        v: torch.Tensor, attn: torch.Tensor, ghost_mul: Optional[torch.Tensor],
        ghost_add: Optional[torch.Tensor], kernel_size: int, dilation: int, apply_softmax: bool,
        backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton_module().elsa_attention_fwd(
            v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax)
    if backend == "cuda":
        return _ext.lib(v).elsa_attention_fwd(
            v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax)
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


@_elsa_attention_fwd.register_fake
def _(v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax, backend):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device,
                       memory_format=output_memory_format(v))


@torch.library.custom_op("pyvit_ops::elsa_attention_bwd", mutates_args=())
def _elsa_attention_bwd(
        dout: torch.Tensor, v: torch.Tensor, attn: torch.Tensor,
        ghost_mul: Optional[torch.Tensor], ghost_add: Optional[torch.Tensor], kernel_size: int,
        dilation: int, apply_softmax: bool, needs_input_grad: List[bool],
        backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dv, dattn, dghost_mul, dghost_add); a gradient that ``needs_input_grad`` does
    not ask for (or of a None ghost tensor) is an empty tensor (custom ops cannot
    return None)."""
    if backend == "triton":
        grads = _triton_module().elsa_attention_bwd(
            dout, v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax,
            needs_input_grad)
    elif backend == "cuda":
        grads = _ext.lib(v).elsa_attention_bwd(
            dout, v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax,
            list(needs_input_grad))
    else:
        raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")
    # The ghost gradients are tiny; contiguous is what register_fake promises.
    grads = [g if i < 2 or g is None else g.contiguous() for i, g in enumerate(grads)]
    return tuple(v.new_empty(0) if g is None else g for g in grads)


@_elsa_attention_bwd.register_fake
def _(dout, v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax,
      needs_input_grad, backend):
    def like(t, wanted):
        if not wanted or t is None:
            return v.new_empty(0)
        if t.dim() == 4:
            return torch.empty(t.shape, dtype=t.dtype, device=t.device,
                               memory_format=output_memory_format(t))
        return t.new_empty(t.shape)

    return tuple(like(t, n) for t, n in zip((v, attn, ghost_mul, ghost_add), needs_input_grad))


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    v, attn, ghost_mul, ghost_add, *params = inputs
    ctx.save_for_backward(v, attn, ghost_mul, ghost_add)
    ctx.params = params


def _backward(ctx, dout):
    v, attn, ghost_mul, ghost_add = ctx.saved_tensors
    kernel_size, dilation, apply_softmax, backend = ctx.params
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = torch.ops.pyvit_ops.elsa_attention_bwd(
        dout, v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax, need, backend)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4


_elsa_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public


def elsa_attention(v, attn, ghost_mul=None, ghost_add=None, *, kernel_size=7, dilation=1,
                   apply_softmax=True, backend=None):
    """ELSA local aggregation: ``y[b, c, o] = sum_t F[c, o, t] * v[b, c, o + delta_t]``,
    ``F[c, o, t] = ghost_mul[c, t] * A[b, g, t, o] + ghost_add[c, t]``.

    v: ``(B, C, H, W)``, NCHW or channels_last (strided views are read in place).
    attn: ``(B, G * K * K, H, W)``, head-major (``attn.view(B, G, K*K, H, W)``), with
    ``G`` heads of ``C / G`` channels: logits when ``apply_softmax`` (the softmax over
    the K*K taps is fused), else probabilities (e.g. after attention dropout).
    ghost_mul, ghost_add: ``(C, K, K)`` static filters of the ghost head, never
    expanded per sample; None means 1 / 0. In v's dtype or float32.
    The window is K x K with dilation ``dilation`` around each pixel (stride 1, odd
    K); taps outside the image are zero padding and the softmax is *not*
    renormalised over the in-image taps, as the official ELSA ``elsa_op`` does.
    Returns ``(B, C, H, W)`` in v's dtype and memory format. Gradients reach v,
    attn (through the softmax), ghost_mul and ghost_add, deterministically (no float
    atomics) on every backend. backend: None (automatic), "reference", "triton"
    or "cuda". Under ``torch.autocast`` (any device type) v and attn are cast to the
    autocast dtype and the operator runs in it (float32 softmax and sums, output in
    that dtype); float32 ghost filters are read as is, with fp32 gradients.
    """
    low = _backend.autocast_dtype(v)
    if low is not None:
        with _backend.autocast_disabled(v):
            return elsa_attention(
                _backend.autocast_cast(v, low), _backend.autocast_cast(attn, low),
                *(_backend.autocast_cast(g, low, keep_float32=True)
                  for g in (ghost_mul, ghost_add)),
                kernel_size=kernel_size, dilation=dilation, apply_softmax=apply_softmax,
                backend=backend)
    heads = _check_args(v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax)
    backend = _backend.choose(
        _OP, backend,
        lambda b: _reasons(b, v, attn, ghost_mul, ghost_add, heads, kernel_size, dilation),
        device=v.device)
    if backend == "reference":
        return reference.elsa_attention(v, attn, ghost_mul, ghost_add, kernel_size=kernel_size,
                                        dilation=dilation, apply_softmax=apply_softmax)
    return torch.ops.pyvit_ops.elsa_attention_fwd(
        v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax, backend)
