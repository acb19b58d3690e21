"""``pyvit_ops.avg_pool2d`` / ``poolformer_pool``: average pooling that leaves the
padding out of the count, with PoolFormer's ``pool(x) - x`` fused.

Backends: "reference" (``pyvit_ops.reference.avg_pool2d``, i.e. torch's
``avg_pool2d``), "triton" (``pyvit_ops.kernels.avg_pool2d``) and "cuda" (the C++
extension's ``avg_pool2d_fwd`` / ``_bwd``). The kernel backends go through the custom
ops ``pyvit_ops::avg_pool2d_fwd`` / ``_bwd``; both are linear in their tensor input,
so each one's gradient is the other and double backward works too.
"""
from typing import List

import torch

from pyvit_ops import _backend, _checks, _ext, capabilities
from pyvit_ops.kernels import _common
from pyvit_ops.reference import avg_pool2d as reference

_OP = "avg_pool2d"


# --------------------------------------------------------------------------- limits


def _triton_module():
    from pyvit_ops.kernels import avg_pool2d as kernels

    return kernels


def _reasons(backend, x, out_shape):
    reasons = _backend.common_reasons(backend, _OP, tensors=[x])
    if backend == "triton" and not _common.offsets_fit_int32(x):
        reasons.append(f"x: one sample spans 2**31 elements or more (shape {tuple(x.shape)}, "
                       f"strides {x.stride()}); the Triton kernel indexes a sample in int32")
    # The outputs are dense: only their element counts matter, as for x in the binding.
    for name, shape in (("x", x.shape), ("the output", out_shape)):
        for count, what in ((shape[0], "images"),
                            (shape[1] * shape[2] * shape[3], "elements per image")):
            reasons += capabilities.limit_reasons(
                _OP, backend, "image", count, f"{name} of shape {tuple(shape)}: {count} {what}")
    return reasons


# --------------------------------------------------------------------------- validation


def _check_args(x, kernel_size, stride, padding, subtract_input):
    _checks.check_tensor("x", x, ndim=4)
    if x.shape[1] == 0:
        # torch's avg_pool2d rejects it too (only the batch may be empty).
        raise ValueError(f"x: expected at least one channel, got shape {tuple(x.shape)}")
    kernel_size, stride, padding = reference.pool_params(kernel_size, stride, padding)
    if min(kernel_size) < 1:
        raise ValueError(f"kernel_size: expected sizes >= 1, got {kernel_size}")
    if min(stride) < 1:
        raise ValueError(f"stride: expected strides >= 1, got {stride}")
    # The kernels and torch's pooling take 32-bit ints.
    for name, values in (("kernel_size", kernel_size), ("stride", stride)):
        if max(values) > _common.INT32_MAX:
            raise ValueError(f"{name}: expected values <= 2**31 - 1, got {values}")
    half = (kernel_size[0] // 2, kernel_size[1] // 2)
    if not (0 <= padding[0] <= half[0] and 0 <= padding[1] <= half[1]):
        raise ValueError(f"padding: expected 0 <= padding <= kernel_size // 2 = {half} per axis "
                         f"(torch's rule), got {padding}")
    out_shape = _common.pool_output_shape(x.shape, kernel_size, stride, padding)
    if min(out_shape[2:]) < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel_size "
                         f"{kernel_size} with padding {padding}: the output would be "
                         f"{tuple(out_shape[2:])}")
    if not isinstance(subtract_input, bool):
        raise TypeError(f"subtract_input: expected a bool, got {subtract_input!r}")
    if subtract_input and stride != (1, 1):
        raise ValueError(f"subtract_input: needs stride (1, 1) (pool(x) - x), got stride {stride}")
    if subtract_input and tuple(out_shape) != tuple(x.shape):
        raise ValueError(f"subtract_input: needs an output the size of x, i.e. an odd "
                         f"kernel_size with padding kernel_size // 2; got output "
                         f"{tuple(out_shape)} for x {tuple(x.shape)} (kernel_size {kernel_size}, "
                         f"padding {padding})")
    return kernel_size, stride, padding


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("pyvit_ops::avg_pool2d_fwd", mutates_args=())
def _avg_pool2d_fwd(x: torch.Tensor, kernel_size: List[int], stride: List[int],
                    padding: List[int], subtract_input: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton_module().avg_pool2d_fwd(
            x, tuple(kernel_size), tuple(stride), tuple(padding), subtract_input)
    if backend == "cuda":
        return _ext.lib(x).avg_pool2d_fwd(x, kernel_size, stride, padding, subtract_input)
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


@_avg_pool2d_fwd.register_fake
def _(x, kernel_size, stride, padding, subtract_input, backend):
    return torch.empty(_common.pool_output_shape(x.shape, kernel_size, stride, padding),
                       dtype=x.dtype, device=x.device,
                       memory_format=_common.pool_memory_format(x))


@torch.library.custom_op("pyvit_ops::avg_pool2d_bwd", mutates_args=())
def _avg_pool2d_bwd(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: List[int],
                    stride: List[int], padding: List[int], subtract_input: bool,
                    backend: str) -> torch.Tensor:
    """grad_x; ``x`` is read for its shape and memory format only."""
    if backend == "triton":
        return _triton_module().avg_pool2d_bwd(
            grad_out, x, tuple(kernel_size), tuple(stride), tuple(padding), subtract_input)
    if backend == "cuda":
        return _ext.lib(x).avg_pool2d_bwd(grad_out, x, kernel_size, stride, padding,
                                          subtract_input)
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


@_avg_pool2d_bwd.register_fake
def _(grad_out, x, kernel_size, stride, padding, subtract_input, backend):
    return torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=_common.pool_memory_format(x))


# --------------------------------------------------------------------------- autograd


def _fwd_setup_context(ctx, inputs, output):
    x, *params = inputs
    # Only x's shape and layout are needed, but torch's own avg_pool2d keeps its input
    # alive for backward as well: same memory as the module this replaces.
    ctx.save_for_backward(x)
    ctx.params = params


def _fwd_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    grad_x = torch.ops.pyvit_ops.avg_pool2d_bwd(grad_out, x, *ctx.params)
    return (grad_x,) + (None,) * len(ctx.params)


def _bwd_setup_context(ctx, inputs, output):
    _, _, *params = inputs
    ctx.params = params


def _bwd_backward(ctx, grad_grad_x):
    # The backward is the transpose of the linear forward map, so its own gradient
    # (double backward) with respect to grad_out is the forward map again.
    grad_grad_out = torch.ops.pyvit_ops.avg_pool2d_fwd(grad_grad_x, *ctx.params)
    return (grad_grad_out, None) + (None,) * len(ctx.params)


_avg_pool2d_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
_avg_pool2d_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# --------------------------------------------------------------------------- public


def avg_pool2d(x, kernel_size=3, stride=1, padding=None, *, subtract_input=False, backend=None):
    """Average pooling over the in-image part of each window.

    Exactly ``torch.nn.functional.avg_pool2d(x, kernel_size, stride, padding,
    ceil_mode=False, count_include_pad=False)``: each output is the mean of the
    window's elements that lie inside the image, so zero padding never dilutes the
    border. x: ``(B, C, H, W)``, NCHW or channels_last or any strided view; the output
    (and x's gradient) comes back in x's memory format, in x's dtype (accumulation in
    float32 in the kernels).

    kernel_size, stride, padding: int or ``(h, w)``; padding defaults to
    ``kernel_size // 2`` and, as in torch, may not exceed it.
    subtract_input: return ``pool(x) - x`` in one pass, forward and backward
    (PoolFormer's token mixer); needs stride 1 and a same-size output (odd kernel
    with the default padding).
    backend: None (automatic), "reference", "triton" or "cuda". The gradient is
    deterministic on every backend (gathered, no atomics).
    Under ``torch.autocast`` (any device type) x is cast to the autocast dtype and
    pooled in it (float32 sums): the memory-bound pooling then moves half the bytes.
    """
    low = _backend.autocast_dtype(x)
    if low is not None:
        with _backend.autocast_disabled(x):
            return avg_pool2d(_backend.autocast_cast(x, low), kernel_size, stride, padding,
                              subtract_input=subtract_input, backend=backend)
    kernel_size, stride, padding = _check_args(x, kernel_size, stride, padding, subtract_input)
    out_shape = _common.pool_output_shape(x.shape, kernel_size, stride, padding)
    backend = _backend.choose(_OP, backend, lambda b: _reasons(b, x, out_shape), device=x.device)
    if backend == "reference":
        return reference.avg_pool2d(x, kernel_size, stride, padding,
                                    subtract_input=subtract_input)
    return torch.ops.pyvit_ops.avg_pool2d_fwd(x, kernel_size, stride, padding, subtract_input,
                                              backend)


def poolformer_pool(x, pool_size=3, *, backend=None):
    """PoolFormer's token mixer, ``AvgPool2d(pool_size, 1, pool_size // 2,
    count_include_pad=False)(x) - x``, fused into one pass (forward and backward).

    x: ``(B, C, H, W)``; returns the same shape, dtype and memory format. pool_size:
    odd int (or ``(h, w)`` of odd ints). backend: as ``avg_pool2d``."""
    _checks.odd_pair("pool_size", pool_size)
    return avg_pool2d(x, pool_size, 1, None, subtract_input=True, backend=backend)
