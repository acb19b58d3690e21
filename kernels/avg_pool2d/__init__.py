"""Triton avg_pool2d (count_include_pad=False) with PoolFormer's fused ``pool(x) - x``.

One program owns a 3-D tile of (channels, rows, columns) of the tensor it writes:
the output in the forward, grad_x in the backward. Both memory formats share one
kernel body; the constexpr ``CHANNELS_LAST`` only decides which tile axis is the
fastest-varying one (W for NCHW, C for channels_last), so that neighbouring
threads touch neighbouring addresses of the layout being read and written.
Every tensor is addressed through its strides (views are read in place) and the
output is allocated in the input's memory format.

Forward: each output sums its ``KH x KW`` window in fp32 (a loop over the window's
rows, each row's taps unrolled, out-of-image taps masked) and divides by the number
of in-image taps. With ``SUBTRACT`` it also subtracts the centre pixel, which the
window has just brought into L1, in the same pass.

Backward, gather form (no atomics, so deterministic): each input pixel sums
``grad_out / count`` over the outputs whose window contains it, at most
``ceil(KH / SH) x ceil(KW / SW)`` of them, and with ``SUBTRACT`` minus the
centre ``grad_out`` (again one of the taps).

Only one row of taps is unrolled so that few loads are in flight per element: with
all 49 taps of a 7x7 window unrolled, ptxas spilled registers on sm_90a.

Offsets inside one sample are int32; the batch offset is int64, so tensors may
exceed 2**31 elements as long as one sample does not (``offsets_fit_int32``).
"""
import torch
import triton
import triton.language as tl

from pyvit_ops.kernels._common import on_tensor_device
from pyvit_ops.reference.avg_pool2d import output_memory_format, output_shape

_NUM_STAGES = 1  # nothing to pipeline: each loop iteration issues its taps' loads at once
_INT32_MAX = 2**31 - 1


@triton.jit
def _tile(C, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w, in-tensor mask) of this program's tile; c, h, w broadcast to a
    3-D tile whose last axis is the contiguous one of the layout."""
    pid = tl.program_id(0)
    n_wb = tl.cdiv(W, BLOCK_W)
    n_hb = tl.cdiv(H, BLOCK_H)
    n_cb = tl.cdiv(C, BLOCK_C)
    # W blocks vary fastest: neighbouring programs share their window halos in L2.
    wb = pid % n_wb
    hb = (pid // n_wb) % n_hb
    cb = (pid // (n_wb * n_hb)) % n_cb
    n = pid // (n_wb * n_hb * n_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    if CHANNELS_LAST:  # tile (H, W, C)
        c, h, w = c[None, None, :], h[:, None, None], w[None, :, None]
    else:  # tile (C, H, W)
        c, h, w = c[:, None, None], h[None, :, None], w[None, None, :]
    return n, c, h, w, (c < C) & (h < H) & (w < W)


@triton.jit
def _in_image(start, K: tl.constexpr, size):
    """How many of the window's taps [start, start + K) lie in [0, size); >= 1."""
    return tl.maximum(tl.minimum(start + K, size) - tl.maximum(start, 0), 1)


@triton.jit
def _avg_pool2d_fwd_kernel(
        x_ptr, out_ptr, C, H, W, OH, OW,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_on, stride_oc, stride_oh, stride_ow,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, SUBTRACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n, c, oh, ow, out_ok = _tile(C, OH, OW, BLOCK_C, BLOCK_H, BLOCK_W, CHANNELS_LAST)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    # In-image taps only (count_include_pad=False).
    count = (_in_image(h0, KH, H) * _in_image(w0, KW, W)).to(tl.float32)

    # Pointer to each window's top-left tap; the taps are scalar offsets from it.
    corner = x_ptr + n.to(tl.int64) * stride_xn + (
        c * stride_xc + h0 * stride_xh + w0 * stride_xw)
    acc = tl.zeros(out_ok.shape, dtype=tl.float32)
    for kh in range(KH):
        ih = h0 + kh
        row_ok = out_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = w0 + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            acc += tl.load(corner + (kh * stride_xh + kw * stride_xw), mask=ok, other=0.0).to(
                tl.float32)
    out = acc / count
    if SUBTRACT:  # stride 1, same size: x[oh, ow] is the tap (PH, PW), a cache hit
        out -= tl.load(corner + (PH * stride_xh + PW * stride_xw), mask=out_ok).to(tl.float32)
    out_ptrs = out_ptr + n.to(tl.int64) * stride_on + (
        c * stride_oc + oh * stride_oh + ow * stride_ow)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _avg_pool2d_bwd_kernel(
        g_ptr, dx_ptr, C, H, W, OH, OW,
        stride_gn, stride_gc, stride_gh, stride_gw,
        stride_dn, stride_dc, stride_dh, stride_dw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, SUBTRACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n, c, ih, iw, in_ok = _tile(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, CHANNELS_LAST)
    # Output row oh covers input rows [oh*SH - PH, oh*SH - PH + KH); the last one
    # that can cover ih is (ih + PH) // SH, and at most ceil(KH / SH) do.
    oh_last = (ih + PH) // SH
    ow_last = (iw + PW) // SW
    # Pointer to each pixel's last candidate output; the others are scalar offsets back.
    last = g_ptr + n.to(tl.int64) * stride_gn + (
        c * stride_gc + oh_last * stride_gh + ow_last * stride_gw)
    acc = tl.zeros(in_ok.shape, dtype=tl.float32)
    for jh in range((KH + SH - 1) // SH):
        oh = oh_last - jh
        h0 = oh * SH - PH
        row_ok = in_ok & (oh >= 0) & (oh < OH)
        if KH % SH != 0:  # then some candidates' windows end above ih
            row_ok = row_ok & (h0 + KH > ih)
        inv_count_h = 1.0 / _in_image(h0, KH, H).to(tl.float32)
        row = tl.zeros(in_ok.shape, dtype=tl.float32)
        for jw in tl.static_range((KW + SW - 1) // SW):
            ow = ow_last - jw
            w0 = ow * SW - PW
            ok = row_ok & (ow >= 0) & (ow < OW)
            if (jw + 1) * SW > KW:
                ok = ok & (w0 + KW > iw)
            g = tl.load(last - (jh * stride_gh + jw * stride_gw), mask=ok, other=0.0)
            row += g.to(tl.float32) * (1.0 / _in_image(w0, KW, W).to(tl.float32))
        acc += row * inv_count_h
    if SUBTRACT:  # stride 1: grad_out[ih, iw] is the candidate (PH, PW), a cache hit
        acc -= tl.load(last - (PH * stride_gh + PW * stride_gw), mask=in_ok).to(tl.float32)
    dx_ptrs = dx_ptr + n.to(tl.int64) * stride_dn + (
        c * stride_dc + ih * stride_dh + iw * stride_dw)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=in_ok)


# Tiles of 512 elements. NCHW: W fastest, sized to the row length so 7x7 / 14x14
# planes are not mostly padding, several planes per program when planes are small.
# channels_last: up to 64 channels fastest (a 128-byte line per pixel in fp16), the
# rest spent on a patch of pixels. Forward: 4 elements per thread (4 warps). The
# backward keeps more per-element state (a count per candidate column), and with 4
# elements per thread ptxas capped sm_90a at 72 registers and spilled: 2 (8 warps).
_NCHW_TILES = {8: (8, 8, 8), 16: (2, 16, 16), 32: (1, 16, 32), 64: (1, 8, 64)}
_CHANNELS_LAST_TILES = {16: (16, 4, 8), 32: (32, 4, 4), 64: (64, 2, 4)}


_NUM_WARPS = {_avg_pool2d_fwd_kernel: 4, _avg_pool2d_bwd_kernel: 8}


def _tile_config(C, W, channels_last):
    """(BLOCK_C, BLOCK_H, BLOCK_W) for a tensor of C channels and row length W."""
    if channels_last:
        return _CHANNELS_LAST_TILES[min(max(triton.next_power_of_2(C), 16), 64)]
    return _NCHW_TILES[min(max(triton.next_power_of_2(W), 8), 64)]


def offsets_fit_int32(t):
    """True if every element offset inside one sample of ``t`` fits in int32."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))
    return span <= _INT32_MAX


def _check_int32(**tensors):
    for name, t in tensors.items():
        if not offsets_fit_int32(t):
            raise ValueError(f"{name}: offsets within one sample must fit in int32, got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")


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
    kernel_size, padding = (kh, kw), (ph, pw)
    B, C, H, W = dst.shape
    channels_last = output_memory_format(dst) == torch.channels_last
    block_c, block_h, block_w = _tile_config(C, W, channels_last)
    grid = (B * triton.cdiv(C, block_c) * triton.cdiv(H, block_h) * triton.cdiv(W, block_w),)
    kernel[grid](
        src, dst, C, *in_hw, *out_hw, *src.stride(), *dst.stride(),
        KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        PH=padding[0], PW=padding[1], SUBTRACT=subtract_input, CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
        num_warps=_NUM_WARPS[kernel], num_stages=_NUM_STAGES)
    return dst


@on_tensor_device
def avg_pool2d_fwd(x, kernel_size, stride, padding, subtract_input):
    """``avg_pool2d(x)`` (minus ``x`` if ``subtract_input``), output in x's memory format.

    kernel_size, stride, padding: ``(h, w)`` tuples, already validated (padding <=
    kernel_size // 2; subtract_input only with stride 1 and a same-size output).
    """
    out = torch.empty(output_shape(x.shape, kernel_size, stride, padding), dtype=x.dtype,
                      device=x.device, memory_format=output_memory_format(x))
    _check_int32(x=x, out=out)
    if out.numel() == 0:
        return out
    return _launch(_avg_pool2d_fwd_kernel, x, out, x.shape[2:], out.shape[2:],
                   kernel_size, stride, padding, subtract_input)


@on_tensor_device
def avg_pool2d_bwd(grad_out, x, kernel_size, stride, padding, subtract_input):
    """grad_x of ``avg_pool2d_fwd``; ``x`` gives only the shape and memory format."""
    grad_x = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=output_memory_format(x))
    _check_int32(grad_out=grad_out, grad_x=grad_x)
    if grad_x.numel() == 0:
        return grad_x
    return _launch(_avg_pool2d_bwd_kernel, grad_out, grad_x, x.shape[2:], grad_out.shape[2:],
                   kernel_size, stride, padding, subtract_input)


# Pooling geometries the static compile check covers: PoolFormer's token mixer with
# kernels 3/5/7 (the unrolled row of taps, and so the registers, grows with the
# kernel width) and a strided pool (the backward's other loop shape).
_SPEC_POOLS = [(3, 1, 1, True), (5, 1, 2, True), (7, 1, 3, True), (3, 2, 1, False)]
_SPEC_DTYPES = ("fp32", "fp16", "bf16")


def static_compile_specs():
    """Every (kernel, layout and tile, dtype) the launchers can pick, for each
    pooling geometry of ``_SPEC_POOLS``. The contiguous axis's strides are the
    constexpr 1, as Triton specialises them at run time for dense tensors."""
    layouts = [(False, tile) for tile in _NCHW_TILES.values()]
    layouts += [(True, tile) for tile in _CHANNELS_LAST_TILES.values()]
    specs = []
    for kernel in (_avg_pool2d_fwd_kernel, _avg_pool2d_bwd_kernel):
        for channels_last, (block_c, block_h, block_w) in layouts:
            unit_axis = "c" if channels_last else "w"
            for k, s, p, sub in _SPEC_POOLS:
                constexprs = {name: 1 for name in kernel.arg_names
                              if name.startswith("stride_") and name.endswith(unit_axis)}
                constexprs.update(KH=k, KW=k, SH=s, SW=s, PH=p, PW=p, SUBTRACT=sub,
                                  CHANNELS_LAST=channels_last, BLOCK_C=block_c,
                                  BLOCK_H=block_h, BLOCK_W=block_w)
                for dtype in _SPEC_DTYPES:
                    signature = {
                        name: "constexpr" if name in constexprs
                        else f"*{dtype}" if name.endswith("_ptr") else "i32"
                        for name in kernel.arg_names}
                    specs.append({
                        "name": (f"{kernel.__name__}_{'cl' if channels_last else 'nchw'}"
                                 f"_c{block_c}h{block_h}w{block_w}_k{k}s{s}p{p}"
                                 f"{'_sub' if sub else ''}_{dtype}"),
                        "fn": kernel, "signature": signature, "constexprs": constexprs,
                        "num_warps": _NUM_WARPS[kernel], "num_stages": _NUM_STAGES})
    return specs
