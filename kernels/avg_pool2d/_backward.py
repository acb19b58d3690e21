"""The backward kernel, gather form (no atomics, so deterministic): each input pixel
sums ``dout / count`` over the outputs whose window contains it."""
import triton
import triton.language as tl

from ._tiles import program_tile, taps_in_image


@triton.jit
def _avg_pool2d_bwd_kernel(
        dout_ptr, dx_ptr, C, H, W, OH, OW,
        stride_dout_b, stride_dout_c, stride_dout_h, stride_dout_w,
        stride_dx_b, stride_dx_c, stride_dx_h, stride_dx_w,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, SUBTRACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    b, c, ih, iw, in_ok = program_tile(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, CHANNELS_LAST)
    # Output row oh covers input rows [oh*SH - PH, oh*SH - PH + KH); the last one
    # that can cover ih is (ih + PH) // SH, and at most ceil(KH / SH) do.
    oh_last = (ih + PH) // SH
    ow_last = (iw + PW) // SW
    # Pointer to each pixel's last candidate output; the others are scalar offsets back.
    last = dout_ptr + b.to(tl.int64) * stride_dout_b + (
        c * stride_dout_c + oh_last * stride_dout_h + ow_last * stride_dout_w)
    acc = tl.zeros(in_ok.shape, dtype=tl.float32)
    for jh in range((KH + SH - 1) // SH):
        oh = oh_last - jh
        h0 = oh * SH - PH
        row_ok = in_ok & (oh >= 0) & (oh < OH)
        if KH % SH != 0:  # then some candidates' windows end above ih
            row_ok = row_ok & (h0 + KH > ih)
        inv_count_h = 1.0 / taps_in_image(h0, KH, H).to(tl.float32)
        row = tl.zeros(in_ok.shape, dtype=tl.float32)
        for jw in tl.static_range((KW + SW - 1) // SW):
            ow = ow_last - jw
            w0 = ow * SW - PW
            ok = row_ok & (ow >= 0) & (ow < OW)
            if (jw + 1) * SW > KW:
                ok = ok & (w0 + KW > iw)
            g = tl.load(last - (jh * stride_dout_h + jw * stride_dout_w), mask=ok, other=0.0)
            row += g.to(tl.float32) * (1.0 / taps_in_image(w0, KW, W).to(tl.float32))
        acc += row * inv_count_h
    if SUBTRACT:  # stride 1: dout[ih, iw] is the candidate (PH, PW), a cache hit
        acc -= tl.load(last - (PH * stride_dout_h + PW * stride_dout_w), mask=in_ok).to(
            tl.float32)
    dx_ptrs = dx_ptr + b.to(tl.int64) * stride_dx_b + (
        c * stride_dx_c + ih * stride_dx_h + iw * stride_dx_w)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=in_ok)
