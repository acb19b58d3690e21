"""The backward kernel, gather form (no atomics, so deterministic): each input pixel
sums ``dout / count`` over the outputs whose window contains it."""
import triton
import triton.language as tl

from ._tiles import program_tile, taps_in_image


@triton.jit
def _avg_pool2d_bwd_kernel(
        dout_ptr, dx_ptr, C, H, W, OH, OW, stride_dout, stride_dx,
        POOL: tl.constexpr, SUBTRACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """dx of ``_avg_pool2d_fwd_kernel`` from dout; one program per tile of dx."""
    b, c, ih, iw, in_ok = program_tile(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, CHANNELS_LAST)
    # Output row oh covers input rows [oh*SH - PH, oh*SH - PH + KH); the last one
    # that can cover ih is (ih + PH) // SH, and at most ceil(KH / SH) do.
    oh_last = (ih + POOL.PH) // POOL.SH
    ow_last = (iw + POOL.PW) // POOL.SW
    # Pointer to each pixel's last candidate output; the others are scalar offsets back.
    last = dout_ptr + b.to(tl.int64) * stride_dout[0] + (
        c * stride_dout[1] + oh_last * stride_dout[2] + ow_last * stride_dout[3])
    acc = tl.zeros(in_ok.shape, dtype=tl.float32)
    for jh in range((POOL.KH + POOL.SH - 1) // POOL.SH):
        oh = oh_last - jh
        h0 = oh * POOL.SH - POOL.PH
        row_ok = in_ok & (oh >= 0) & (oh < OH)
        if POOL.KH % POOL.SH != 0:  # then some candidates' windows end above ih
            row_ok = row_ok & (h0 + POOL.KH > ih)
        inv_count_h = 1.0 / taps_in_image(h0, POOL.KH, H).to(tl.float32)
        row = tl.zeros(in_ok.shape, dtype=tl.float32)
        for jw in tl.static_range((POOL.KW + POOL.SW - 1) // POOL.SW):
            ow = ow_last - jw
            w0 = ow * POOL.SW - POOL.PW
            ok = row_ok & (ow >= 0) & (ow < OW)
            if (jw + 1) * POOL.SW > POOL.KW:
                ok = ok & (w0 + POOL.KW > iw)
            g = tl.load(last - (jh * stride_dout[2] + jw * stride_dout[3]), mask=ok, other=0.0)
            row += g.to(tl.float32) * (1.0 / taps_in_image(w0, POOL.KW, W).to(tl.float32))
        acc += row * inv_count_h
    if SUBTRACT:  # stride 1: dout[ih, iw] is the candidate (PH, PW), a cache hit
        acc -= tl.load(last - (POOL.PH * stride_dout[2] + POOL.PW * stride_dout[3]),
                       mask=in_ok).to(tl.float32)
    dx_ptrs = dx_ptr + b.to(tl.int64) * stride_dx[0] + (
        c * stride_dx[1] + ih * stride_dx[2] + iw * stride_dx[3])
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=in_ok)
