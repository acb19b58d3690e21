"""Triton avg_pool2d (count_include_pad=False) with PoolFormer's fused ``pool(x) - x``:
the launchers and their tile configurations. The kernels are in ``_forward.py`` and
``_backward.py``; docs/design/avg_pool2d.md explains the design."""
import torch
import triton

from pyvit_ops.kernels._common import (check_int32, on_tensor_device, pool_memory_format,
                                       pool_output_shape)

from ._backward import _avg_pool2d_bwd_kernel
from ._forward import _avg_pool2d_fwd_kernel
from ._tiles import Pool

_NUM_STAGES = 1  # nothing to pipeline: each loop iteration issues its taps' loads at once

# (BLOCK_C, BLOCK_H, BLOCK_W) tiles of 512 elements. NCHW, keyed by the row length: W
# fastest, sized to the row so that 7x7 / 14x14 planes are not mostly padding.
# channels_last, keyed by the channels: up to 64 channels fastest (a 128-byte line per
# pixel in fp16), the rest a patch of pixels.
_NCHW_TILES = {8: (8, 8, 8), 16: (2, 16, 16), 32: (1, 16, 32), 64: (1, 8, 64)}
_CHANNELS_LAST_TILES = {16: (16, 4, 8), 32: (32, 4, 4), 64: (64, 2, 4)}

# Forward: 4 elements per thread. The backward keeps more state per element (a count
# per candidate column): 2 per thread, or ptxas spills on sm_90a.
_NUM_WARPS = {_avg_pool2d_fwd_kernel: 4, _avg_pool2d_bwd_kernel: 8}


def _tile_config(C, W, channels_last):
    """(BLOCK_C, BLOCK_H, BLOCK_W) for a tensor of C channels and row length W."""
    if channels_last:
        return _CHANNELS_LAST_TILES[min(max(triton.next_power_of_2(C), 16), 64)]
    return _NCHW_TILES[min(max(triton.next_power_of_2(W), 8), 64)]


def clamp_window(size, out, k, s, p):
    """(k, p) of one axis with the window clamped to the image, the same pooling: window
    o covers [o*s - p, o*s - p + k) clipped to [0, size), and only the clipped part counts
    (count_include_pad=False). Its start is clipped to 0 for every output once p >= (out -
    1) * s, its end to ``size`` once k - p >= size; so p' = min(p, (out - 1) * s) and k' =
    p' + min(k - p, size) clip every window to the same taps, keep the output size, and
    bound the taps the kernels unroll by twice the image."""
    p_clamped = min(p, (out - 1) * s)
    return p_clamped + min(k - p, size), p_clamped


def _launch(kernel, src, dst, in_hw, out_hw, kernel_size, stride, padding, subtract_input):
    """Run ``kernel`` over tiles of ``dst``, gathering from ``src``; ``in_hw`` and
    ``out_hw`` are the pooling input's and output's spatial sizes."""
    (kh, ph), (kw, pw) = (clamp_window(*axis) for axis in
                          zip(in_hw, out_hw, kernel_size, stride, padding))
    B, C, H, W = dst.shape
    channels_last = pool_memory_format(dst) == torch.channels_last
    block_c, block_h, block_w = _tile_config(C, W, channels_last)
    # One program per tile, the batch included: grid axis 0 takes 2**31 - 1 programs.
    grid = (B * triton.cdiv(C, block_c) * triton.cdiv(H, block_h) * triton.cdiv(W, block_w),)
    kernel[grid](
        src, dst, C, *in_hw, *out_hw, src.stride(), dst.stride(),
        POOL=Pool(kh, kw, *stride, ph, pw), SUBTRACT=subtract_input, CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
        num_warps=_NUM_WARPS[kernel], num_stages=_NUM_STAGES)
    return dst


@on_tensor_device
def avg_pool2d_fwd(x, kernel_size, stride, padding, subtract_input):
    """``avg_pool2d(x)`` (minus ``x`` if ``subtract_input``), output in x's memory format.

    kernel_size, stride, padding: ``(h, w)`` tuples, already validated (padding <=
    kernel_size // 2; subtract_input only with stride 1 and a same-size output).
    """
    out = torch.empty(pool_output_shape(x.shape, kernel_size, stride, padding), dtype=x.dtype,
                      device=x.device, memory_format=pool_memory_format(x))
    check_int32(x=x, out=out)
    if out.numel() == 0:
        return out
    return _launch(_avg_pool2d_fwd_kernel, x, out, x.shape[2:], out.shape[2:],
                   kernel_size, stride, padding, subtract_input)


@on_tensor_device
def avg_pool2d_bwd(grad_out, x, kernel_size, stride, padding, subtract_input):
    """grad_x of ``avg_pool2d_fwd``; ``x`` gives only the shape and memory format."""
    grad_x = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=pool_memory_format(x))
    check_int32(grad_out=grad_out, grad_x=grad_x)
    if grad_x.numel() == 0:
        return grad_x
    return _launch(_avg_pool2d_bwd_kernel, grad_out, grad_x, x.shape[2:], grad_out.shape[2:],
                   kernel_size, stride, padding, subtract_input)
