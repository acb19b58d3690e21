"""The forward kernel: each output the mean of its window's in-image taps."""
import triton
import triton.language as tl

from ._tiles import program_tile, taps_in_image


@triton.jit
def _avg_pool2d_fwd_kernel(
        x_ptr, out_ptr, C, H, W, OH, OW, stride_x, stride_out,
        POOL: tl.constexpr, SUBTRACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """out = avg_pool2d(x) over the window ``POOL`` (a ``Pool``), minus x if ``SUBTRACT``;
    one program per tile of out."""
    b, c, oh, ow, out_ok = program_tile(C, OH, OW, BLOCK_C, BLOCK_H, BLOCK_W, CHANNELS_LAST)
    h0 = oh * POOL.SH - POOL.PH
    w0 = ow * POOL.SW - POOL.PW
    # In-image taps only (count_include_pad=False).
    count = (taps_in_image(h0, POOL.KH, H) * taps_in_image(w0, POOL.KW, W)).to(tl.float32)

    # Pointer to each window's top-left tap; the taps are scalar offsets from it.
    corner = x_ptr + b.to(tl.int64) * stride_x[0] + (
        c * stride_x[1] + h0 * stride_x[2] + w0 * stride_x[3])
    acc = tl.zeros(out_ok.shape, dtype=tl.float32)
    # One row of taps unrolled at a time: few loads in flight per element.
    for kh in range(POOL.KH):
        ih = h0 + kh
        row_ok = out_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(POOL.KW):
            iw = w0 + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            acc += tl.load(corner + (kh * stride_x[2] + kw * stride_x[3]), mask=ok, other=0.0).to(
                tl.float32)
    out = acc / count
    if SUBTRACT:  # stride 1, same size: x[oh, ow] is the tap (PH, PW), a cache hit
        out -= tl.load(corner + (POOL.PH * stride_x[2] + POOL.PW * stride_x[3]),
                       mask=out_ok).to(tl.float32)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out[0] + (
        c * stride_out[1] + oh * stride_out[2] + ow * stride_out[3])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_ok)
