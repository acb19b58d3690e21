"""The ELSA aggregation in gather form: the forward kernel and the dv kernel (its
transpose), one program per (sample, head, pixel tile), sharing the tap loop."""
import triton
import triton.language as tl

from pyvit_ops.kernels.elsa_attention._softmax import _log_normaliser, _softmax_prob


@triton.jit
def _pixel_tile(tile, H, W, BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Flat pixel index, row, column and in-image mask of pixel tile ``tile``, shaped to
    broadcast against the (channels, pixels) / (pixels, channels) tile."""
    pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pix < H * W
    h = pix // W
    w = pix % W
    if CHANNELS_LAST:
        return pix[:, None], h[:, None], w[:, None], ok[:, None]
    else:
        return pix[None, :], h[None, :], w[None, :], ok[None, :]


@triton.jit
def _channel_tile(CG, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        return c[None, :], (c < CG)[None, :]
    else:
        return c[:, None], (c < CG)[:, None]


@triton.jit
def _head_program(G, CG, H, W, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr):
    """Sample, head, pixel rows / columns / mask and the head's channels / mask of a
    program of the 1-D grid of B * G * (pixel tiles) programs (tiles fastest, then
    heads), as broadcasting tiles."""
    n_tiles = tl.cdiv(H * W, BLOCK_P)
    pid = tl.program_id(0)
    bg = pid // n_tiles
    g = bg % G
    _, h, w, ok = _pixel_tile(pid % n_tiles, H, W, BLOCK_P, CHANNELS_LAST)
    c, c_ok = _channel_tile(CG, BLOCK_C, CHANNELS_LAST)
    return (bg // G).to(tl.int64), g, h, w, ok, g * CG + c, c_ok


@triton.jit
def _ghost_filter(p, mul_ptr, add_ptr, ch, c_ok, ty, tx,
                  stride_mul_c, stride_mul_h, stride_mul_w,
                  stride_add_c, stride_add_h, stride_add_w,
                  HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr):
    """``M[ch, ty, tx] * p + D[ch, ty, tx]`` in fp32, from the unexpanded ghost tensors."""
    f = p
    if HAS_MUL:
        f = f * tl.load(mul_ptr + (ch * stride_mul_c + ty * stride_mul_h + tx * stride_mul_w),
                        mask=c_ok, other=0.0).to(tl.float32)
    if HAS_ADD:
        f = f + tl.load(add_ptr + (ch * stride_add_c + ty * stride_add_h + tx * stride_add_w),
                        mask=c_ok, other=0.0).to(tl.float32)
    return f


@triton.jit
def _gather_taps(x_base, x_off, stride_x_h, stride_x_w,
                 attn_base, stride_attn_c, stride_attn_h, stride_attn_w, lse_base,
                 mul_ptr, add_ptr, stride_mul_c, stride_mul_h, stride_mul_w,
                 stride_add_c, stride_add_h, stride_add_w,
                 ch, c_ok, h, w, ok, H, W, DIL,
                 K: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
                 APPLY_SOFTMAX: tl.constexpr, TRANSPOSED: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``sum_t (M[:, t] * p_t + D[:, t]) * x[o + s * delta_t]`` over the K*K taps of the
    tile's pixels o, in fp32. Forward (s = 1): p_t is pixel o's, its softmax normaliser
    computed here. TRANSPOSED (s = -1, the dv gather): pixel o - delta_t saw o through
    tap t, so p_t is that pixel's, its normaliser (m, log_s) read from ``lse_base``
    ((2, H*W) fp32). Out-of-image taps are masked (zero padding, no renormalisation).

    Scalar base pointers plus int32 offset tiles: 64-bit pointer tiles kept live across
    the tap loop would cost two registers per element."""
    R: tl.constexpr = K // 2
    attn_off = h * stride_attn_h + w * stride_attn_w
    if APPLY_SOFTMAX and not TRANSPOSED:
        m, log_s = _log_normaliser(attn_base, attn_off, ok, stride_attn_c, K)
    acc = tl.zeros((BLOCK_P, BLOCK_C) if CHANNELS_LAST else (BLOCK_C, BLOCK_P), dtype=tl.float32)
    for ty in range(K):
        if TRANSPOSED:
            hh = h - (ty - R) * DIL
        else:
            hh = h + (ty - R) * DIL
        row_ok = ok & (hh >= 0) & (hh < H)
        for tx in range(K):
            if TRANSPOSED:
                ww = w - (tx - R) * DIL
            else:
                ww = w + (tx - R) * DIL
            tap_ok = row_ok & (ww >= 0) & (ww < W)
            if TRANSPOSED:
                p_off = (ty * K + tx) * stride_attn_c + hh * stride_attn_h + ww * stride_attn_w
            else:
                p_off = attn_off + (ty * K + tx) * stride_attn_c
            # Out-of-image taps meet x = 0: their logit is not loaded, and their p is 0
            # (exp(0 - m - log_s) would overflow to inf, inf * 0 = NaN, when m < -88).
            p = tl.load(attn_base + p_off, mask=tap_ok, other=0.0).to(tl.float32)
            if APPLY_SOFTMAX:
                if TRANSPOSED:
                    m_t = tl.load(lse_base + (hh * W + ww), mask=tap_ok, other=0.0)
                    log_s_t = tl.load(lse_base + (H * W + hh * W + ww), mask=tap_ok, other=0.0)
                    p = tl.where(tap_ok, _softmax_prob(p, m_t, log_s_t), 0.0)
                else:
                    p = tl.where(tap_ok, _softmax_prob(p, m, log_s), 0.0)
            f = _ghost_filter(p, mul_ptr, add_ptr, ch, c_ok, ty, tx,
                              stride_mul_c, stride_mul_h, stride_mul_w,
                              stride_add_c, stride_add_h, stride_add_w, HAS_MUL, HAS_ADD)
            x = tl.load(x_base + (x_off + hh * stride_x_h + ww * stride_x_w), mask=c_ok & tap_ok,
                        other=0.0).to(tl.float32)
            acc += f * x
    return acc


@triton.jit
def _elsa_attention_fwd_kernel(
        v_ptr, attn_ptr, mul_ptr, add_ptr, out_ptr,
        G, CG, H, W,
        stride_v_b, stride_v_c, stride_v_h, stride_v_w,
        stride_attn_b, stride_attn_c, stride_attn_h, stride_attn_w,
        stride_mul_c, stride_mul_h, stride_mul_w,
        stride_add_c, stride_add_h, stride_add_w,
        stride_out_b, stride_out_c, stride_out_h, stride_out_w,
        DIL,
        K: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
        APPLY_SOFTMAX: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # out[o] = sum_t (M[:, t] * p_t(o) + D[:, t]) * v[o + delta_t]
    b, g, h, w, ok, ch, c_ok = _head_program(G, CG, H, W, BLOCK_C, BLOCK_P, CHANNELS_LAST)
    acc = _gather_taps(
        v_ptr + b * stride_v_b, ch * stride_v_c, stride_v_h, stride_v_w,
        attn_ptr + b * stride_attn_b + (g * K * K) * stride_attn_c,
        stride_attn_c, stride_attn_h, stride_attn_w, attn_ptr,
        mul_ptr, add_ptr, stride_mul_c, stride_mul_h, stride_mul_w,
        stride_add_c, stride_add_h, stride_add_w, ch, c_ok, h, w, ok, H, W, DIL,
        K, HAS_MUL, HAS_ADD, APPLY_SOFTMAX, False, CHANNELS_LAST, BLOCK_C, BLOCK_P)
    out_off = ch * stride_out_c + h * stride_out_h + w * stride_out_w
    tl.store(out_ptr + b * stride_out_b + out_off, acc.to(out_ptr.dtype.element_ty),
             mask=c_ok & ok)


@triton.jit
def _elsa_attention_bwd_v_kernel(
        dout_ptr, attn_ptr, mul_ptr, add_ptr, lse_ptr, dv_ptr,
        G, CG, H, W,
        stride_dout_b, stride_dout_c, stride_dout_h, stride_dout_w,
        stride_attn_b, stride_attn_c, stride_attn_h, stride_attn_w,
        stride_mul_c, stride_mul_h, stride_mul_w,
        stride_add_c, stride_add_h, stride_add_w,
        stride_dv_b, stride_dv_c, stride_dv_h, stride_dv_w,
        DIL,
        K: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
        APPLY_SOFTMAX: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # dv[o] = sum_t (M[:, t] * p_t(o - delta_t) + D[:, t]) * dout[o - delta_t], the
    # probabilities rebuilt from the logits and the attn-gradient kernel's normaliser.
    b, g, h, w, ok, ch, c_ok = _head_program(G, CG, H, W, BLOCK_C, BLOCK_P, CHANNELS_LAST)
    acc = _gather_taps(
        dout_ptr + b * stride_dout_b, ch * stride_dout_c, stride_dout_h, stride_dout_w,
        attn_ptr + b * stride_attn_b + (g * K * K) * stride_attn_c,
        stride_attn_c, stride_attn_h, stride_attn_w, lse_ptr + (b * G + g) * 2 * H * W,
        mul_ptr, add_ptr, stride_mul_c, stride_mul_h, stride_mul_w,
        stride_add_c, stride_add_h, stride_add_w, ch, c_ok, h, w, ok, H, W, DIL,
        K, HAS_MUL, HAS_ADD, APPLY_SOFTMAX, True, CHANNELS_LAST, BLOCK_C, BLOCK_P)
    dv_off = ch * stride_dv_c + h * stride_dv_h + w * stride_dv_w
    tl.store(dv_ptr + b * stride_dv_b + dv_off, acc.to(dv_ptr.dtype.element_ty), mask=c_ok & ok)
