"""Triton ELSA local aggregation, forward and backward.

Notation: v (B, C, H, W), attn (B, G*KK, H, W) with KK = K*K taps, head g owns the
channels [g*CG, (g+1)*CG), M / D the (C, K, K) ghost tensors (None: M = 1, D = 0),
p the softmax of the logits over the taps (or attn itself without the softmax),
``delta_t = ((ty - K//2) * d, (tx - K//2) * d)``, o a pixel.

Tiles. Every program owns one head (all CG channels, ``BLOCK_C = next_pow2(CG)``)
and BLOCK_P consecutive pixels of the flattened H*W plane: flattening wastes no
lanes at row ends (56, 28, 14 are not powers of two) and keeps neighbouring lanes on
neighbouring addresses. Tiles are (channels, pixels) for NCHW and (pixels, channels)
for channels_last (constexpr ``CHANNELS_LAST``): the last, fastest-varying axis is
the layout's contiguous one, W runs for NCHW, head vectors (vectorised loads) for
channels_last. Pixel-only quantities (logits, statistics) are tiles with size-1
channel axes. Every tensor is read through its strides (the JIT specialises the unit
stride); offsets are int32 within a sample, the batch offset int64. For
channels_last the ghost tensors are read from a (K, K, C)-contiguous copy (C*KK
elements) so that a tap's row of M / D is a vector load.

Softmax, fused and never materialised: a program first computes its pixels'
normaliser ``(m, log_s)`` (max logit, log of the sum of exp(l - m)) over the KK
logits in registers (a max pass and a sum pass), then rebuilds ``p_t = exp2(((l_t -
m) - log_s) * log2(e))`` tap by tap from the same, cache-hot logits (finite for any
finite logits). The logits cross DRAM once; no probability tensor is written.

Grids are 1-D (axes 1 and 2 stop at 65535): batch and heads fold into axis 0.

Forward (``_elsa_attention_fwd_kernel``, B * G * pixel tiles programs): per tap,
``acc += (M[:, t] * p_t + D[:, t]) * v[o + delta_t]`` in fp32 over the tile, the
ghost filter built on the fly from the unexpanded tensors; out-of-image taps are
masked (zero padding, no renormalisation).

Backward, two kernels (three with ghost gradients), no float atomics:
- ``_elsa_attention_bwd_attn_kernel`` (batch chunks * G * tile chunks programs), tiles
  (row taps, pixels, channels) holding one row of K taps (padded to K_PAD). A program
  works on (sample, pixel tile) items: a chunk of samples times a chunk of tiles
  (``work_chunks``). A pre-pass over its items stores each pixel's normaliser and,
  for the softmax backward ``dl_t = p_t * (dp_t - sum_s p_s dp_s)``, the sum
  ``sum_s p_s dp_s = sum_c dy[c] sum_s M[c, s] p_s v[c, o + delta_s]`` (aggregated
  like the forward) in fp32 scratch. Then, per row ty and per item:
  ``prod = dy * v[o + delta_t]`` for the row's taps, ``dp_t = sum_c M[c, t] prod``
  (grad of p), dl_t (or dp_t without the softmax) written to dattn once in its dtype,
  and ``p_t * prod`` / ``prod`` accumulated in
  registers over the items; after them they are reduced over the pixels into this
  program's fp32 partial rows of dM / dD, buffers (programs, C, KK) that
  ``_elsa_attention_bwd_ghost_kernel`` sums in a fixed order (deterministic) and
  stores once in the ghost dtype (no fp32 result, cast or transpose passes). Rows outer,
  items inner: the expensive cross-thread reduction over pixels happens once per
  row and program instead of per tap and item, and a row's K taps share one band
  of v. A partial row (KK * C fp32) weighs as much as ~16 pixels' compulsory
  traffic, so every program gets at least _MIN_ITEMS items, from several tiles when
  the batch is small (at batch 1 one tile per program would double the bytes).
  No dp is stored and re-read: a half-precision intermediate would overflow (dp_t -
  dp_centre under a scaled loss) and cancel (dp relative to a small-p centre tap).
- ``_elsa_attention_bwd_v_kernel`` (B * G * pixel tiles programs), the transposed
  aggregation in gather form, like the forward:
  ``dv[o] = sum_t (M[:, t] * p_t(o - delta_t) + D[:, t]) * dy[o - delta_t]``, the
  probabilities rebuilt from the logits and the normaliser of the attn kernel.

Nothing is saved by the forward: the backward reads the logits once per kernel,
which saved probabilities would cost as well, and the forward saves a (B, G*KK, H,
W) write. Only the (B, G, 2, H*W) fp32 normaliser passes between the two backward
kernels.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pyvit_ops.kernels._common import on_tensor_device
from pyvit_ops.reference.elsa_attention import effective_dilation, output_memory_format

_LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x * log2(e))
_NUM_STAGES = 1  # nothing to software-pipeline: no tl.dot, loads are gathers
_MAX_TILE_CL = 1024  # BLOCK_C * BLOCK_P of the channels_last forward / dv kernels
_CL_PIXELS = (64, 32, 16, 8)  # their BLOCK_P candidates, largest first
_MAX_TILE_ATTN = 4096  # K_PAD * BLOCK_C * BLOCK_P of the attn-gradient kernel
MAX_HEAD_CHANNELS = 128  # BLOCK_C = next_pow2(C / G) must hold one head
_TARGET_PROGRAMS = 1024  # attn-gradient kernel: ~8 waves on 132 SMs, few partial rows
_MIN_ITEMS = 8  # attn-gradient kernel: (sample, pixel tile) pairs per partial row, at least
_INT32_MAX = 2**31 - 1


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
def _ghost_filter(p, m_ptr, d_ptr, ch, c_ok, ty, tx, stride_mc, stride_mh, stride_mw,
                  stride_dc, stride_dh, stride_dw, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr):
    """``M[ch, ty, tx] * p + D[ch, ty, tx]`` in fp32, from the unexpanded ghost tensors."""
    f = p
    if HAS_MUL:
        f = f * tl.load(m_ptr + (ch * stride_mc + ty * stride_mh + tx * stride_mw),
                        mask=c_ok, other=0.0).to(tl.float32)
    if HAS_ADD:
        f = f + tl.load(d_ptr + (ch * stride_dc + ty * stride_dh + tx * stride_dw),
                        mask=c_ok, other=0.0).to(tl.float32)
    return f


@triton.jit
def _zero_tile(BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    return tl.zeros((BLOCK_P, BLOCK_C) if CHANNELS_LAST else (BLOCK_C, BLOCK_P), dtype=tl.float32)


@triton.jit
def _softmax_prob(l, m, log_s):
    """exp(l - m - log_s) in base 2, for the normaliser ``(m, log_s)`` of
    ``_log_normaliser``. The differences come first: l * log2(e) overflows fp32 for
    logits near +-finfo.max; l - m does not for finite logits of one softmax, and m +
    log_s would round log_s away."""
    return tl.exp2(((l - m) - log_s) * _LOG2E)


@triton.jit
def _log_normaliser(a_base, a_off, ok, stride_ac, K: tl.constexpr):
    """log(sum_t exp(l_t)) per pixel as (max m, log(sum_t exp(l_t - m))), kept apart:
    their fp32 sum loses the second for |m| > 2**26. A max pass, then a sum pass over
    the (cache-hot) logits, one exp2 per tap (an online max / sum needs two). Row by
    row, so that the compiler unrolls K loads at a time, not K*K (registers)."""
    m = tl.full(ok.shape, float("-inf"), tl.float32)
    for ty in range(K):
        for tx in range(K):
            # Lanes outside the image read 0, so that their statistics stay finite.
            l = tl.load(a_base + (a_off + (ty * K + tx) * stride_ac), mask=ok, other=0.0)
            m = tl.maximum(m, l.to(tl.float32))
    s = tl.zeros(ok.shape, tl.float32)
    for ty in range(K):
        for tx in range(K):
            l = tl.load(a_base + (a_off + (ty * K + tx) * stride_ac), mask=ok, other=0.0)
            s += _softmax_prob(l.to(tl.float32), m, 0.0)
    return m, tl.log(s)


@triton.jit
def _elsa_attention_fwd_kernel(
        v_ptr, a_ptr, m_ptr, d_ptr, out_ptr,
        G, CG, H, W,
        stride_vb, stride_vc, stride_vh, stride_vw,
        stride_ab, stride_ac, stride_ah, stride_aw,
        stride_mc, stride_mh, stride_mw,
        stride_dc, stride_dh, stride_dw,
        stride_ob, stride_oc, stride_oh, stride_ow,
        DIL,
        K: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
        APPLY_SOFTMAX: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, g, h, w, ok, ch, c_ok = _head_program(G, CG, H, W, BLOCK_C, BLOCK_P, CHANNELS_LAST)
    R: tl.constexpr = K // 2

    # Scalar base pointers plus int32 offset tiles: 64-bit pointer tiles kept live
    # across the tap loop would cost two registers per element.
    a_base = a_ptr + b * stride_ab + (g * K * K) * stride_ac
    a_off = h * stride_ah + w * stride_aw
    if APPLY_SOFTMAX:
        m, log_s = _log_normaliser(a_base, a_off, ok, stride_ac, K)
    v_base = v_ptr + b * stride_vb
    v_off = ch * stride_vc
    acc = _zero_tile(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    for ty in range(K):
        hh = h + (ty - R) * DIL
        row_ok = ok & (hh >= 0) & (hh < H)
        for tx in range(K):
            ww = w + (tx - R) * DIL
            tap_ok = row_ok & (ww >= 0) & (ww < W)
            # Out-of-image taps meet x = 0: their logit is not loaded, and their p is 0
            # (exp(0 - m - log_s) would overflow to inf, inf * 0 = NaN, when m < -88).
            p = tl.load(a_base + (a_off + (ty * K + tx) * stride_ac), mask=tap_ok, other=0.0)
            p = p.to(tl.float32)
            if APPLY_SOFTMAX:
                p = tl.where(tap_ok, _softmax_prob(p, m, log_s), 0.0)
            f = _ghost_filter(p, m_ptr, d_ptr, ch, c_ok, ty, tx, stride_mc, stride_mh, stride_mw,
                              stride_dc, stride_dh, stride_dw, HAS_MUL, HAS_ADD)
            x = tl.load(v_base + (v_off + hh * stride_vh + ww * stride_vw), mask=c_ok & tap_ok,
                        other=0.0).to(tl.float32)
            acc += f * x
    out_off = ch * stride_oc + h * stride_oh + w * stride_ow
    tl.store(out_ptr + b * stride_ob + out_off, acc.to(out_ptr.dtype.element_ty), mask=c_ok & ok)


@triton.jit
def _attn_item(i, n_t, b_start, t_start, H, W, BLOCK_P: tl.constexpr, P_AXIS: tl.constexpr):
    """Sample and pixels (flat index, row, column, in-image mask; size-1 tap and channel
    axes) of work item i of an attn-gradient program: samples outer, pixel tiles inner."""
    pix = (t_start + i % n_t) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.expand_dims(tl.expand_dims(pix, 0), 3 - P_AXIS)
    return (b_start + i // n_t).to(tl.int64), pix, pix // W, pix % W, pix < H * W


@triton.jit
def _elsa_attention_bwd_attn_kernel(
        dy_ptr, v_ptr, a_ptr, m_ptr, da_ptr, lse_ptr, mean_ptr, pm_ptr, pd_ptr,
        B, G, C, CG, H, W, B_CHUNK, T_CHUNK,
        stride_yb, stride_yc, stride_yh, stride_yw,
        stride_vb, stride_vc, stride_vh, stride_vw,
        stride_ab, stride_ac, stride_ah, stride_aw,
        stride_mc, stride_mh, stride_mw,
        stride_gb, stride_gc, stride_gh, stride_gw,
        DIL,
        K: tl.constexpr, HAS_MUL: tl.constexpr, APPLY_SOFTMAX: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, NEED_DATTN: tl.constexpr, NEED_DMUL: tl.constexpr,
        NEED_DADD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr):
    # 3-D tiles (row taps, pixels, channels) for channels_last, (row taps, channels,
    # pixels) for NCHW: the contiguous axis last, a row of K taps as the leading axis.
    # The program's work items are (sample, pixel tile) pairs: B_CHUNK samples times
    # T_CHUNK tiles of BLOCK_P pixels. 1-D grid: tile chunks fastest, then heads, then
    # sample chunks.
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    C_AXIS: tl.constexpr = 2 if CHANNELS_LAST else 1
    P_AXIS: tl.constexpr = 1 if CHANNELS_LAST else 2
    SOFTMAX_GRAD: tl.constexpr = NEED_DATTN and APPLY_SOFTMAX
    n_tiles = tl.cdiv(H * W, BLOCK_P)
    n_tile_chunks = tl.cdiv(n_tiles, T_CHUNK)
    pid = tl.program_id(0)
    tile_chunk = pid % n_tile_chunks
    g = (pid // n_tile_chunks) % G
    sample_chunk = pid // n_tile_chunks // G
    c = tl.expand_dims(tl.expand_dims(tl.arange(0, BLOCK_C), 0), 3 - C_AXIS)
    c_ok = c < CG
    ch = g * CG + c
    tx = tl.expand_dims(tl.expand_dims(tl.arange(0, K_PAD), 1), 2)
    v_off = ch * stride_vc
    dy_off = ch * stride_yc
    b_start = sample_chunk * B_CHUNK
    t_start = tile_chunk * T_CHUNK
    n_t = tl.minimum(T_CHUNK, n_tiles - t_start)
    n_items = tl.minimum(B_CHUNK, B - b_start) * n_t

    # Per-sample pixel statistics, kept in fp32 scratch for the tap loop: the normaliser
    # (B, G, 2, H*W), (m, log_s) per pixel, also for the dv kernel, and the mean below
    # (B, G, H*W).
    if APPLY_SOFTMAX:
        for i in range(n_items):
            b, pix, h, w, ok = _attn_item(i, n_t, b_start, t_start, H, W, BLOCK_P, P_AXIS)
            stat_ptrs = (b * G + g) * H * W + pix
            lse_ptrs = lse_ptr + ((b * G + g) * 2 * H * W + pix)
            a_base = a_ptr + b * stride_ab + (g * KK) * stride_ac
            a_off = h * stride_ah + w * stride_aw
            m, log_s = _log_normaliser(a_base, a_off, ok, stride_ac, K)
            tl.store(lse_ptrs, m, mask=ok)
            tl.store(lse_ptrs + H * W, log_s, mask=ok)
            if SOFTMAX_GRAD:
                # The softmax backward's sum_t p_t dp_t = sum_c dy[c] sum_t M[c, t] p_t
                # v[c, o + delta_t], aggregated like the forward: the tap loop then
                # stores each dl_t = p_t (dp_t - sum) at once, no dp is rounded or
                # stored in between (and none cancels against another's rounding).
                agg = tl.zeros((K_PAD, BLOCK_P, BLOCK_C) if CHANNELS_LAST
                               else (K_PAD, BLOCK_C, BLOCK_P), tl.float32)
                for ty in range(K):
                    hh = h + (ty - R) * DIL
                    ww = w + (tx - R) * DIL
                    tap_ok = (tx < K) & ok & (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
                    p = tl.load(a_base + (a_off + (ty * K + tx) * stride_ac), mask=tap_ok,
                                other=0.0).to(tl.float32)
                    # Masked taps: p = 0, not exp(0 - m - log_s) (inf when m < -88).
                    f = tl.where(tap_ok, _softmax_prob(p, m, log_s), 0.0)
                    if HAS_MUL:
                        f = f * tl.load(m_ptr + (ch * stride_mc + ty * stride_mh + tx * stride_mw),
                                        mask=c_ok & (tx < K), other=0.0).to(tl.float32)
                    agg += f * tl.load(v_ptr + b * stride_vb + (v_off + hh * stride_vh
                                                                + ww * stride_vw),
                                       mask=c_ok & tap_ok, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + b * stride_yb + (dy_off + h * stride_yh + w * stride_yw),
                             mask=c_ok & ok, other=0.0).to(tl.float32)
                mean = tl.sum(tl.sum(agg, axis=0, keep_dims=True) * dy, axis=C_AXIS,
                              keep_dims=True)
                tl.store(mean_ptr + stat_ptrs, mean, mask=ok)
        # Other threads may reload what this one stored.
        tl.debug_barrier()

    # Rows of taps outer, work items inner: a row's K taps share one band of v (L1
    # reuse), and dM / dD accumulate over the items in registers, paying their
    # cross-thread reduction over pixels and their partial row once per row.
    part_off = (sample_chunk * n_tile_chunks + tile_chunk) * KK * C + ch * KK
    for ty in range(K):
        t = ty * K + tx
        if HAS_MUL and NEED_DATTN:
            mt = tl.load(m_ptr + (ch * stride_mc + ty * stride_mh + tx * stride_mw),
                         mask=c_ok & (tx < K), other=0.0).to(tl.float32)
        acc_m = tl.zeros((K_PAD, BLOCK_P, BLOCK_C) if CHANNELS_LAST else (K_PAD, BLOCK_C, BLOCK_P),
                         tl.float32)
        acc_d = tl.zeros((K_PAD, BLOCK_P, BLOCK_C) if CHANNELS_LAST else (K_PAD, BLOCK_C, BLOCK_P),
                         tl.float32)
        for i in range(n_items):
            b, pix, h, w, ok = _attn_item(i, n_t, b_start, t_start, H, W, BLOCK_P, P_AXIS)
            hh = h + (ty - R) * DIL
            ww = w + (tx - R) * DIL
            tap_ok = (tx < K) & ok & (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
            prod = tl.load(dy_ptr + b * stride_yb + (dy_off + h * stride_yh + w * stride_yw),
                           mask=c_ok & ok, other=0.0).to(tl.float32)
            prod *= tl.load(v_ptr + b * stride_vb + (v_off + hh * stride_vh + ww * stride_vw),
                            mask=c_ok & tap_ok, other=0.0).to(tl.float32)
            if NEED_DMUL or SOFTMAX_GRAD:
                p = tl.load(a_ptr + b * stride_ab + ((g * KK + t) * stride_ac + h * stride_ah
                                                     + w * stride_aw),
                            mask=(tx < K) & ok, other=0.0).to(tl.float32)
                if APPLY_SOFTMAX:
                    lse_ptrs = lse_ptr + ((b * G + g) * 2 * H * W + pix)
                    p = _softmax_prob(p, tl.load(lse_ptrs, mask=ok, other=0.0),
                                      tl.load(lse_ptrs + H * W, mask=ok, other=0.0))
            if NEED_DATTN:
                if HAS_MUL:
                    dp = tl.sum(prod * mt, axis=C_AXIS, keep_dims=True)
                else:
                    dp = tl.sum(prod, axis=C_AXIS, keep_dims=True)
                if SOFTMAX_GRAD:
                    dp = p * (dp - tl.load(mean_ptr + (b * G + g) * H * W + pix, mask=ok,
                                           other=0.0))
                da_ptrs = da_ptr + b * stride_gb + ((g * KK + t) * stride_gc + h * stride_gh
                                                    + w * stride_gw)
                tl.store(da_ptrs, dp.to(da_ptr.dtype.element_ty), mask=(tx < K) & ok)
            if NEED_DMUL:
                acc_m += prod * p
            if NEED_DADD:
                acc_d += prod
        if NEED_DMUL:
            tl.store(pm_ptr + (part_off + t), tl.sum(acc_m, axis=P_AXIS, keep_dims=True),
                     mask=c_ok & (tx < K))
        if NEED_DADD:
            tl.store(pd_ptr + (part_off + t), tl.sum(acc_d, axis=P_AXIS, keep_dims=True),
                     mask=c_ok & (tx < K))


@triton.jit
def _elsa_attention_bwd_ghost_kernel(part_ptr, out_ptr, PARTS, N, BLOCK: tl.constexpr):
    # dM / dD: the attn kernel's PARTS partial rows (PARTS, N = C*K*K) summed in a fixed
    # order in fp32 and stored once in the ghost dtype, (C, K, K)-contiguous.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(PARTS):
        acc += tl.load(part_ptr + i * N + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _elsa_attention_bwd_v_kernel(
        dy_ptr, a_ptr, m_ptr, d_ptr, lse_ptr, dv_ptr,
        G, CG, H, W,
        stride_yb, stride_yc, stride_yh, stride_yw,
        stride_ab, stride_ac, stride_ah, stride_aw,
        stride_mc, stride_mh, stride_mw,
        stride_dc, stride_dh, stride_dw,
        stride_xb, stride_xc, stride_xh, stride_xw,
        DIL,
        K: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
        APPLY_SOFTMAX: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, g, h, w, ok, ch, c_ok = _head_program(G, CG, H, W, BLOCK_C, BLOCK_P, CHANNELS_LAST)
    R: tl.constexpr = K // 2

    a_base = a_ptr + b * stride_ab + (g * K * K) * stride_ac
    lse_base = lse_ptr + (b * G + g) * 2 * H * W
    dy_base = dy_ptr + b * stride_yb
    dy_off = ch * stride_yc
    acc = _zero_tile(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    for ty in range(K):
        # Output pixel o = i - delta_t saw this pixel i through tap t.
        hh = h - (ty - R) * DIL
        row_ok = ok & (hh >= 0) & (hh < H)
        for tx in range(K):
            ww = w - (tx - R) * DIL
            tap_ok = row_ok & (ww >= 0) & (ww < W)
            p = tl.load(a_base + ((ty * K + tx) * stride_ac + hh * stride_ah + ww * stride_aw),
                        mask=tap_ok, other=0.0).to(tl.float32)
            if APPLY_SOFTMAX:
                m = tl.load(lse_base + (hh * W + ww), mask=tap_ok, other=0.0)
                log_s = tl.load(lse_base + (H * W + hh * W + ww), mask=tap_ok, other=0.0)
                p = tl.where(tap_ok, _softmax_prob(p, m, log_s), 0.0)
            f = _ghost_filter(p, m_ptr, d_ptr, ch, c_ok, ty, tx, stride_mc, stride_mh, stride_mw,
                              stride_dc, stride_dh, stride_dw, HAS_MUL, HAS_ADD)
            x = tl.load(dy_base + (dy_off + hh * stride_yh + ww * stride_yw), mask=c_ok & tap_ok,
                        other=0.0).to(tl.float32)
            acc += f * x
    dv_off = ch * stride_xc + h * stride_xh + w * stride_xw
    tl.store(dv_ptr + b * stride_xb + dv_off, acc.to(dv_ptr.dtype.element_ty), mask=c_ok & ok)


# --------------------------------------------------------------------------- launchers


class TileConfig(NamedTuple):
    block_c: int
    block_p: int          # forward and dv kernels
    num_warps: int
    block_p_attn: int     # attn-gradient kernel, whose tile also spans a row of taps
    num_warps_attn: int


def tile_config(CG, HW, K, channels_last):
    """Tiles of the programs: always the whole head (``BLOCK_C = next_pow2(CG)``, >= 8).

    Forward / dv, (channels, pixels) tiles: NCHW, 32 pixels (one warp's lanes along W,
    warps along channels, <= 2K elements); channels_last, <= 1K elements, head vectors
    per thread, the most pixels that pad the H*W plane by at most 1/8 (56²: 32, 28²:
    32, 14²: 16). Attn-gradient kernel: (row taps, pixels, channels) tiles of ~4K
    elements, 8 per thread at 16 warps (it keeps two accumulators per element), 8
    warps for heads of more than 32 channels. Every config is spill-free on sm_80 /
    sm_90a (``static_compile_specs``)."""
    block_c = max(triton.next_power_of_2(CG), 8)
    block_p = 32
    if channels_last:
        fits = [p for p in _CL_PIXELS if block_c * p <= _MAX_TILE_CL]
        block_p = next((p for p in fits if triton.cdiv(HW, p) * p * 8 <= HW * 9), fits[-1])
    return _tile(block_c, block_p, K)


def _tile(block_c, block_p, K):
    k_pad = triton.next_power_of_2(K)
    block_p_attn = max(_MAX_TILE_ATTN // (k_pad * block_c), 4)
    warps_attn = min(max(k_pad * block_c * block_p_attn // 256, 1), 16 if block_c <= 32 else 8)
    return TileConfig(block_c, block_p, min(max(block_c * block_p // 256, 1), 8),
                      block_p_attn, warps_attn)


def launch_options(num_warps):
    """Launch options of a kernel run with ``num_warps`` warps. ``maxnreg`` is the
    hardware limit for that block size: without it ptxas trades a few spilled
    registers for occupancy on its own (seen on sm_80 / sm_90a at 40-128 registers)."""
    return {"num_warps": num_warps, "num_stages": _NUM_STAGES,
            "maxnreg": min(255, 65536 // (32 * num_warps))}


def int32_reasons(**tensors):
    """Why the kernels cannot index these tensors (offsets within one sample are int32)."""
    reasons = []
    for name, t in tensors.items():
        span = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))
        if span > _INT32_MAX:
            reasons.append(f"{name}: offsets within one sample must fit in int32, got shape "
                           f"{tuple(t.shape)} with strides {t.stride()}")
    return reasons


def _check_int32(**tensors):
    reasons = int32_reasons(**tensors)
    if reasons:
        raise ValueError(reasons[0])


def _ghost_args(ghost, channels_last, placeholder):
    """(tensor, strides) of a ghost tensor for the kernels. For channels_last tiles a
    thread holds a vector of channels, so the (C, K, K) parameter is read through a
    (K, K, C)-contiguous copy (C*K*K elements, not data-sized) that makes the
    per-tap row M[:, ty, tx] one vector load instead of a load per channel."""
    if ghost is None:
        return placeholder, (0, 0, 0)
    if channels_last:
        ghost = ghost.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return ghost, ghost.stride()


def _setup(v, attn, kernel_size):
    B, C, H, W = v.shape
    G = attn.shape[1] // (kernel_size * kernel_size)
    channels_last = output_memory_format(v) == torch.channels_last
    return B, C, H, W, G, channels_last, tile_config(C // G, H * W, kernel_size, channels_last)


def head_grid(B, G, HW, block_p):
    """Grid of the forward and dv kernels: every (sample, head, pixel tile) on axis 0,
    whose limit is 2**31 - 1 programs (axes 1 and 2 stop at 65535)."""
    return (B * G * triton.cdiv(HW, block_p),)


def attn_grid(B, G, n_tiles, chunk, tile_chunk):
    """Grid of the attn-gradient kernel: (sample chunk, head, tile chunk) on axis 0."""
    return (triton.cdiv(B, chunk) * G * triton.cdiv(n_tiles, tile_chunk),)


@on_tensor_device
def elsa_attention_fwd(v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax):
    """ELSA aggregation; returns ``out`` (B, C, H, W) in v's dtype and memory format.
    Arguments are assumed validated (``pyvit_ops.ops.elsa_attention``)."""
    B, C, H, W, G, channels_last, cfg = _setup(v, attn, kernel_size)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device, memory_format=output_memory_format(v))
    if out.numel() == 0:
        return out
    _check_int32(v=v, attn=attn)
    mul, mul_strides = _ghost_args(ghost_mul, channels_last, v)
    add, add_strides = _ghost_args(ghost_add, channels_last, v)
    _elsa_attention_fwd_kernel[head_grid(B, G, H * W, cfg.block_p)](
        v, attn, mul, add, out, G, C // G, H, W,
        *v.stride(), *attn.stride(), *mul_strides, *add_strides, *out.stride(),
        effective_dilation(dilation, H, W),
        K=kernel_size, HAS_MUL=ghost_mul is not None, HAS_ADD=ghost_add is not None,
        APPLY_SOFTMAX=apply_softmax, CHANNELS_LAST=channels_last,
        BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, **launch_options(cfg.num_warps))
    return out


def work_chunks(B, n_tiles, G):
    """(samples, pixel tiles) per program of the attn-gradient kernel. Enough work items
    to keep about _TARGET_PROGRAMS programs, and at least _MIN_ITEMS: each program
    writes one fp32 (K*K, C) partial row of dM / dD, as many bytes as ~16 pixels'
    compulsory traffic, so a row must stand for many (sample, pixel) pairs. Samples
    first: a batch of at least that many items gets one tile per program; a smaller one
    all its samples and several tiles per program. Chunks are split evenly."""
    items = max(triton.cdiv(B * n_tiles * G, _TARGET_PROGRAMS), _MIN_ITEMS)
    if items <= B:
        return triton.cdiv(B, triton.cdiv(B, items)), 1
    tiles = min(n_tiles, triton.cdiv(items, B))
    return B, triton.cdiv(n_tiles, triton.cdiv(n_tiles, tiles))


_GHOST_BLOCK = 1024  # C*K*K is 4.7K-25K at ELSA-Swin: a few programs, vector loads
_GHOST_WARPS = 4


def _ghost_grad(parts, ghost):
    out = torch.empty(ghost.shape, dtype=ghost.dtype, device=ghost.device)
    n = out.numel()
    _elsa_attention_bwd_ghost_kernel[(triton.cdiv(n, _GHOST_BLOCK),)](
        parts, out, parts.shape[0], n, BLOCK=_GHOST_BLOCK, **launch_options(_GHOST_WARPS))
    return out


@on_tensor_device
def elsa_attention_bwd(dout, v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax,
                       needs_input_grad):
    """Gradients ``(dv, dattn, dmul, dadd)`` of ``elsa_attention_fwd``; an entry is
    None when ``needs_input_grad`` (4 bools, in that order) says it is not needed or
    its ghost tensor is None. Deterministic: no atomics, fixed-order reductions."""
    B, C, H, W, G, channels_last, cfg = _setup(v, attn, kernel_size)
    K = kernel_size
    KK = K * K
    dilation = effective_dilation(dilation, H, W)
    need_dv, need_dattn, need_dmul, need_dadd = (bool(n) for n in needs_input_grad)
    need_dmul = need_dmul and ghost_mul is not None
    need_dadd = need_dadd and ghost_add is not None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device,
                     memory_format=output_memory_format(v)) if need_dv else None
    dattn = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device,
                        memory_format=output_memory_format(attn)) if need_dattn else None
    if v.numel() == 0:
        # Nothing aggregated (B, C or H*W is 0): a gradient with elements is zero.
        return (dv, dattn.zero_() if need_dattn else None,
                torch.zeros_like(ghost_mul) if need_dmul else None,
                torch.zeros_like(ghost_add) if need_dadd else None)
    _check_int32(dout=dout, v=v, attn=attn)
    scratch = dict(dtype=torch.float32, device=v.device)
    dummy = torch.empty(1, **scratch)  # for pointers a configuration does not read
    mul, mul_strides = _ghost_args(ghost_mul, channels_last, v)
    # Per-pixel softmax normaliser (m, log_s), written by the attn kernel, read by the dv
    # kernel.
    lse = torch.empty((B, G, 2, H * W), **scratch) if apply_softmax else dummy
    common = dict(K=K, HAS_MUL=ghost_mul is not None, APPLY_SOFTMAX=apply_softmax,
                  CHANNELS_LAST=channels_last, BLOCK_C=cfg.block_c)

    dmul = dadd = None
    if need_dattn or need_dmul or need_dadd or (need_dv and apply_softmax):
        n_tiles = triton.cdiv(H * W, cfg.block_p_attn)
        chunk, tile_chunk = work_chunks(B, n_tiles, G)
        parts = (triton.cdiv(n_tiles, tile_chunk) * triton.cdiv(B, chunk), C, KK)
        part_mul = torch.empty(parts, **scratch) if need_dmul else dummy
        part_add = torch.empty(parts, **scratch) if need_dadd else dummy
        # sum_t p_t dp_t per pixel, for the softmax backward.
        dp_mean = torch.empty((B, G, H * W), **scratch) if need_dattn and apply_softmax else dummy
        da = dattn if need_dattn else attn
        _elsa_attention_bwd_attn_kernel[attn_grid(B, G, n_tiles, chunk, tile_chunk)](
            dout, v, attn, mul, da, lse, dp_mean, part_mul, part_add,
            B, G, C, C // G, H, W, chunk, tile_chunk,
            *dout.stride(), *v.stride(), *attn.stride(), *mul_strides, *da.stride(), dilation,
            NEED_DATTN=need_dattn, NEED_DMUL=need_dmul, NEED_DADD=need_dadd,
            K_PAD=triton.next_power_of_2(K), BLOCK_P=cfg.block_p_attn,
            **launch_options(cfg.num_warps_attn), **common)
        dmul = _ghost_grad(part_mul, ghost_mul) if need_dmul else None
        dadd = _ghost_grad(part_add, ghost_add) if need_dadd else None

    if need_dv:
        add, add_strides = _ghost_args(ghost_add, channels_last, v)
        _elsa_attention_bwd_v_kernel[head_grid(B, G, H * W, cfg.block_p)](
            dout, attn, mul, add, lse, dv, G, C // G, H, W,
            *dout.stride(), *attn.stride(), *mul_strides, *add_strides, *dv.stride(), dilation,
            HAS_ADD=ghost_add is not None, BLOCK_P=cfg.block_p, **launch_options(cfg.num_warps),
            **common)
    return dv, dattn, dmul, dadd


# --------------------------------------------------------------------------- static compile specs

_KERNELS = {"fwd": _elsa_attention_fwd_kernel, "bwd_attn": _elsa_attention_bwd_attn_kernel,
            "bwd_v": _elsa_attention_bwd_v_kernel}
_SCRATCH_PTRS = ("lse_ptr", "mean_ptr", "pm_ptr", "pd_ptr")  # fp32 buffers of the launcher
_DATA_TENSORS = "vaoygx"  # stride_<t>?: v, attn, out, dout, dattn, dv
_CHANNEL_SIZED = "voyx"   # tensors with C channels (attn / dattn have G*K*K)
_TRITON_DTYPES = ("fp16", "bf16", "fp32")


def _spec_tiles(K=7):
    """Every TileConfig the launchers can pick at window K: (channels_last, config)."""
    tiles = []
    for block_c in (8, 16, 32, 64, MAX_HEAD_CHANNELS):
        tiles.append((False, _tile(block_c, 32, K)))
        tiles += [(True, _tile(block_c, p, K)) for p in _CL_PIXELS if block_c * p <= _MAX_TILE_CL]
    return tiles


def _spec(kernel, channels_last, cfg, dtype, K=7, dilation=1, div16=False, ghost_dtype=None,
          flags=None):
    fn = _KERNELS[kernel]
    unit = "c" if channels_last else "w"
    signature, constexprs, divisible = {}, {}, []
    for arg in fn.arg_names:
        if arg.endswith("_ptr"):
            ptr_dtype = ghost_dtype if arg in ("m_ptr", "d_ptr") and ghost_dtype else dtype
            signature[arg] = "*fp32" if arg in _SCRATCH_PTRS else f"*{ptr_dtype}"
        elif arg.startswith("stride_"):
            tensor, axis = arg[len("stride_")], arg[-1]
            # The JIT specialises strides equal to 1 (dense innermost axis) to constexprs;
            # ghost tensors are (C, K, K)-contiguous for NCHW, (K, K, C) for channels_last.
            if axis == unit and (tensor in _DATA_TENSORS or tensor in "md"):
                constexprs[arg] = 1
            else:
                signature[arg] = "i32"
                if div16 and (axis == "b" or (tensor in "md" if channels_last else axis == "c")
                              or (channels_last and tensor in _CHANNEL_SIZED)):
                    divisible.append(arg)
        elif arg == "DIL":
            if dilation == 1:
                constexprs[arg] = 1
            else:
                signature[arg] = "i32"
        elif arg.isupper() and arg not in ("B", "G", "C", "CG", "H", "W", "B_CHUNK", "T_CHUNK"):
            continue  # constexpr, set below
        else:
            signature[arg] = "i32"
            if div16 and arg in ("C", "CG"):
                divisible.append(arg)
    attn = kernel == "bwd_attn"
    block_p = cfg.block_p_attn if attn else cfg.block_p
    values = dict(K=K, K_PAD=triton.next_power_of_2(K), HAS_MUL=True, HAS_ADD=True,
                  APPLY_SOFTMAX=True, CHANNELS_LAST=channels_last, NEED_DATTN=True,
                  NEED_DMUL=True, NEED_DADD=True, BLOCK_C=cfg.block_c, BLOCK_P=block_p)
    values.update(flags or {})
    constexprs.update({k: v for k, v in values.items() if k in fn.arg_names})
    signature.update({k: "constexpr" for k in constexprs})
    layout = "cl" if channels_last else "nchw"
    name = (f"{fn.__name__}_{layout}_c{cfg.block_c}p{block_p}_k{K}"
            f"{'_dil' if dilation != 1 else ''}{'_div16' if div16 else ''}"
            f"{f'_ghost{ghost_dtype}' if ghost_dtype else ''}"
            + "".join(f"_{k.lower()}{int(v)}" for k, v in (flags or {}).items()) + f"_{dtype}")
    options = launch_options(cfg.num_warps_attn if attn else cfg.num_warps)
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
            "divisible_by_16": divisible, "dtype": dtype, **options}


def static_compile_specs():
    """Every (kernel, tile config, dtype) the launchers can pick, at K = 7 with every
    option on (both ghost tensors, fused softmax, every gradient: the most registers),
    nothing assumed about strides but the unit one. Plus, for the ELSA-Swin head
    (32 channels): the same with the 16-divisibility the JIT sees at its shapes
    (C = 96, 56²: vectorised channels_last loads) and fp32 ghost tensors (AMP), the
    ELSA-Swin options (M = 1, lambda = 0), K = 3 and 5 and a runtime dilation."""
    specs = []
    for channels_last, cfg in _spec_tiles():
        for kernel in _KERNELS:
            for dtype in _TRITON_DTYPES:
                specs.append(_spec(kernel, channels_last, cfg, dtype))
                if cfg.block_c == 32:  # half inputs come with fp32 ghost parameters under AMP
                    specs.append(_spec(kernel, channels_last, cfg, dtype, div16=True,
                                       ghost_dtype="fp32"))
            if cfg.block_c == 32:
                specs.append(_spec(kernel, channels_last, cfg, "bf16", div16=True,
                                   ghost_dtype="fp32", flags={"HAS_MUL": False}))
                specs.append(_spec(kernel, channels_last, cfg, "fp16", dilation=2))
                for K in (3, 5):
                    specs += [_spec(kernel, cl, cfg_k, "fp16", K=K) for cl, cfg_k in _spec_tiles(K)
                              if (cl, cfg_k.block_c, cfg_k.block_p) == (channels_last, 32, cfg.block_p)]
    for dtype in _TRITON_DTYPES:  # the ghost-gradient sum, per ghost dtype
        specs.append({"name": f"{_elsa_attention_bwd_ghost_kernel.__name__}_{dtype}",
                      "fn": _elsa_attention_bwd_ghost_kernel,
                      "signature": {"part_ptr": "*fp32", "out_ptr": f"*{dtype}", "PARTS": "i32",
                                    "N": "i32", "BLOCK": "constexpr"},
                      "constexprs": {"BLOCK": _GHOST_BLOCK}, "divisible_by_16": [],
                      "dtype": dtype, **launch_options(_GHOST_WARPS)})
    # Tiles that differ only in the forward's BLOCK_P share the attn-gradient kernel.
    return list({spec["name"]: spec for spec in specs}.values())
