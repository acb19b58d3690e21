"""The forward kernel: each output the mean of its window's in-image taps."""
import triton
import triton.language as tl

from ._tiles import program_tile, taps_in_image


@triton.jit
def _avg_pool2d_fwd_kernel(
        x_ptr, out_ptr, C, H, W, OH, OW,
        stride_x_b, stride_x_c, stride_x_h, stride_x_w,
        stride_out_b, stride_out_c, stride_out_h, stride_out_w,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, SUBTRACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    b, c, oh, ow, out_ok = program_tile(C, OH, OW, BLOCK_C, BLOCK_H, BLOCK_W, CHANNELS_LAST)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    # In-image taps only (count_include_pad=False).
    count = (taps_in_image(h0, KH, H) * taps_in_image(w0, KW, W)).to(tl.float32)

    # Pointer to each window's top-left tap; the taps are scalar offsets from it.
    corner = x_ptr + b.to(tl.int64) * stride_x_b + (
        c * stride_x_c + h0 * stride_x_h + w0 * stride_x_w)
    acc = tl.zeros(out_ok.shape, dtype=tl.float32)
    # One row of taps unrolled at a time: few loads in flight per element.
    for kh in range(KH):
        ih = h0 + kh
        row_ok = out_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = w0 + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            acc += tl.load(corner + (kh * stride_x_h + kw * stride_x_w), mask=ok, other=0.0).to(
                tl.float32)
    out = acc / count
    if SUBTRACT:  # stride 1, same size: x[oh, ow] is the tap (PH, PW), a cache hit
        out -= tl.load(corner + (PH * stride_x_h + PW * stride_x_w), mask=out_ok).to(tl.float32)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + (
        c * stride_out_c + oh * stride_out_h + ow * stride_out_w)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_ok)
