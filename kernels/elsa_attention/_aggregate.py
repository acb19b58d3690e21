"""The ELSA aggregation in gather form: one kernel for the forward and, transposed, for
dv, one program per (sample, head, pixel tile)."""
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
def _ghost_filter(p, mul_ptr, add_ptr, ch, c_ok, ty, tx, stride_mul, stride_add,
                  HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr):
    """``M[ch, ty, tx] * p + D[ch, ty, tx]`` in fp32, from the unexpanded ghost tensors
    of (c, h, w) strides ``stride_mul`` / ``stride_add``."""
    f = p
    if HAS_MUL:
        f = f * tl.load(mul_ptr + (ch * stride_mul[0] + ty * stride_mul[1] + tx * stride_mul[2]),
                        mask=c_ok, other=0.0).to(tl.float32)
    if HAS_ADD:
        f = f + tl.load(add_ptr + (ch * stride_add[0] + ty * stride_add[1] + tx * stride_add[2]),
                        mask=c_ok, other=0.0).to(tl.float32)
    return f


@triton.jit
def _elsa_attention_aggregate_kernel(
        x_ptr, attn_ptr, mul_ptr, add_ptr, lse_ptr, y_ptr, G, CG, H, W,
        stride_x, stride_attn, stride_mul, stride_add, stride_y, DIL,
        K: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
        APPLY_SOFTMAX: tl.constexpr, TRANSPOSED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``y[o] = sum_t (M[:, t] * p_t + D[:, t]) * x[o + S * delta_t]`` over the K*K taps
    of the program's pixels o, accumulated in fp32; (b, c, h, w) strides for x, y and
    the logits, (c, h, w) for the ghosts.

    Forward (x = v, y = out, S = 1): p_t is pixel o's, its softmax normaliser computed
    here; ``lse_ptr`` is unread. TRANSPOSED, the dv gather (x = dout, y = dv, S = -1):
    pixel o - delta_t saw o through tap t, so p_t is that pixel's, rebuilt from the
    logits and its normaliser (m, log_s), which the attn-gradient kernel stores at
    ``lse_ptr`` ((B, G, 2, H*W) fp32). Out-of-image taps are masked (zero padding, no
    renormalisation).

    Scalar base pointers plus int32 offset tiles: 64-bit pointer tiles kept live across
    the tap loop would cost two registers per element."""
    b, g, h, w, ok, ch, c_ok = _head_program(G, CG, H, W, BLOCK_C, BLOCK_P, CHANNELS_LAST)
    R: tl.constexpr = K // 2
    x_base = x_ptr + b * stride_x[0]
    x_off = ch * stride_x[1]
    attn_base = attn_ptr + b * stride_attn[0] + (g * K * K) * stride_attn[1]
    lse_base = lse_ptr + (b * G + g) * 2 * H * W
    attn_off = h * stride_attn[2] + w * stride_attn[3]
    if APPLY_SOFTMAX and not TRANSPOSED:
        m, log_s = _log_normaliser(attn_base, attn_off, ok, stride_attn[1], K)
    acc = tl.zeros((BLOCK_P, BLOCK_C) if CHANNELS_LAST else (BLOCK_C, BLOCK_P), dtype=tl.float32)
    S: tl.constexpr = -1 if TRANSPOSED else 1
    for ty in range(K):
        hh = h + S * (ty - R) * DIL
        row_ok = ok & (hh >= 0) & (hh < H)
        for tx in range(K):
            ww = w + S * (tx - R) * DIL
            tap_ok = row_ok & (ww >= 0) & (ww < W)
            if TRANSPOSED:
                p_off = (ty * K + tx) * stride_attn[1] + hh * stride_attn[2] + ww * stride_attn[3]
            else:
                p_off = attn_off + (ty * K + tx) * stride_attn[1]
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
            f = _ghost_filter(p, mul_ptr, add_ptr, ch, c_ok, ty, tx, stride_mul, stride_add,
                              HAS_MUL, HAS_ADD)
            x = tl.load(x_base + (x_off + hh * stride_x[2] + ww * stride_x[3]),
                        mask=c_ok & tap_ok, other=0.0).to(tl.float32)
            acc += f * x
    y_off = ch * stride_y[1] + h * stride_y[2] + w * stride_y[3]
    tl.store(y_ptr + b * stride_y[0] + y_off, acc.to(y_ptr.dtype.element_ty), mask=c_ok & ok)
