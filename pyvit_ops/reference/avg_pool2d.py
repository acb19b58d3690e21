"""Reference avg_pool2d / PoolFormer pooling: plain, differentiable PyTorch.

The semantics are those of ``torch.nn.functional.avg_pool2d(..., ceil_mode=False,
count_include_pad=False)``: each output is the mean of the window's in-image
elements only. Every backend takes the output's shape and layout from the same
helpers, ``pool_output_shape`` and ``pool_memory_format`` of ``pyvit_ops.kernels._common``.
"""
import torch
import torch.nn.functional as F

from pyvit_ops import _checks
from pyvit_ops.kernels._common import pool_memory_format as output_memory_format


def pool_params(kernel_size, stride, padding):
    """Normalise int-or-pair arguments to ``(h, w)`` tuples; padding defaults to
    ``kernel_size // 2``."""
    kernel_size = _checks.pair("kernel_size", kernel_size)
    stride = _checks.pair("stride", stride)
    if padding is None:
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
    return kernel_size, stride, _checks.pair("padding", padding)


def avg_pool2d(x, kernel_size=3, stride=1, padding=None, *, subtract_input=False):
    """Average pooling that excludes padding from the count; ``subtract_input``
    returns ``pool(x) - x`` (needs a same-size output, i.e. stride 1)."""
    kernel_size, stride, padding = pool_params(kernel_size, stride, padding)
    if subtract_input:
        return _PoolMinusInput.apply(x, kernel_size, stride, padding)
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode=False, count_include_pad=False)


# Channels from which the channels_last CPU pooling kernel beats the NCHW one.
MIN_VECTOR_CHANNELS = 16


class _PoolMinusInput(torch.autograd.Function):
    """``pool(x) - x`` with torch's pooling, holding one image-sized tensor where the
    composition holds two, forward and backward (the CPU path's peak memory). The
    backward is made of differentiable torch ops, so double backward still works."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding):
        ctx.save_for_backward(x)
        ctx.pool = (kernel_size, stride, padding)
        # torch's CPU pooling vectorises over channels only in channels_last: with a SIMD
        # width of channels it is several times faster than the NCHW kernel, layout copies
        # included (its backward is not: it would hold one more image-sized tensor).
        wide = x.device.type == "cpu" and x.shape[1] >= MIN_VECTOR_CHANNELS
        pooled = x.contiguous(memory_format=torch.channels_last) if wide else x
        y = F.avg_pool2d(pooled, kernel_size, stride, padding, ceil_mode=False,
                         count_include_pad=False)
        del pooled
        return y.contiguous(memory_format=output_memory_format(x)).sub_(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding = ctx.pool
        grad_x = torch.ops.aten.avg_pool2d_backward(grad, x, kernel_size, stride, padding,
                                                    False, False, None)
        # In place also under create_graph: the pooling backward's own backward does not
        # need its output.
        return grad_x.sub_(grad), None, None, None


def poolformer_pool(x, pool_size=3):
    """PoolFormer's token mixer: ``AvgPool2d(pool_size, 1, pool_size // 2,
    count_include_pad=False)(x) - x``."""
    return avg_pool2d(x, pool_size, 1, None, subtract_input=True)
