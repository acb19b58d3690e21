"""The ELSA attn-gradient kernel (dattn and the partial rows of dM / dD, plus the
softmax normaliser the dv aggregation reads) and the kernel that sums those partial
rows."""
import triton
import triton.language as tl

from pyvit_ops.kernels.elsa_attention._softmax import _log_normaliser, _softmax_prob


@triton.jit
def _attn_item(i, n_t, b_start, t_start, H, W, BLOCK_P: tl.constexpr, P_AXIS: tl.constexpr):
    """Sample and pixels (flat index, row, column, in-image mask; size-1 tap and channel
    axes) of work item i of an attn-gradient program: samples outer, pixel tiles inner."""
    pix = (t_start + i % n_t) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = tl.expand_dims(tl.expand_dims(pix, 0), 3 - P_AXIS)
    return (b_start + i // n_t).to(tl.int64), pix, pix // W, pix % W, pix < H * W


@triton.jit
def _row_prod(dout_ptr, v_ptr, b, dout_off, v_off, h, w, hh, ww, c_ok, ok, tap_ok,
              stride_dout, stride_v):
    """prod = dy[c, o] * v[c, o + delta_t] in fp32 for a row of taps (zero where masked);
    (b, c, h, w) strides."""
    prod = tl.load(dout_ptr + b * stride_dout[0] + (dout_off + h * stride_dout[2]
                                                    + w * stride_dout[3]),
                   mask=c_ok & ok, other=0.0).to(tl.float32)
    prod *= tl.load(v_ptr + b * stride_v[0] + (v_off + hh * stride_v[2] + ww * stride_v[3]),
                    mask=c_ok & tap_ok, other=0.0).to(tl.float32)
    return prod


@triton.jit
def _row_dp(prod, mt, HAS_MUL: tl.constexpr, C_AXIS: tl.constexpr):
    """dp_t = sum_c M[c, t] prod[c] for a row of taps. The pre-pass and the tap loop both
    compute dp through this (same operations, order and reduction), so that the tap
    loop's dp_t - sum_s p_s dp_s cancels exactly where the softmax is constant (one tap:
    dattn = 0, as PyTorch gets)."""
    if HAS_MUL:
        dp = tl.sum(prod * mt, axis=C_AXIS, keep_dims=True)
    else:
        dp = tl.sum(prod, axis=C_AXIS, keep_dims=True)
    return dp


@triton.jit
def _elsa_attention_bwd_attn_kernel(
        dout_ptr, v_ptr, attn_ptr, mul_ptr, dattn_ptr, lse_ptr, mean_ptr,
        part_mul_ptr, part_add_ptr,
        B, G, C, CG, H, W, B_CHUNK, T_CHUNK,
        stride_dout, stride_v, stride_attn, stride_mul, stride_dattn, DIL,
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
    v_off = ch * stride_v[1]
    dout_off = ch * stride_dout[1]
    b_start = sample_chunk * B_CHUNK
    t_start = tile_chunk * T_CHUNK
    n_t = tl.minimum(T_CHUNK, n_tiles - t_start)
    n_items = tl.minimum(B_CHUNK, B - b_start) * n_t

    # Per-sample pixel statistics, kept in fp32 scratch for the tap loop: the normaliser
    # (B, G, 2, H*W), (m, log_s) per pixel, also for the dv aggregation, and the mean
    # below (B, G, H*W).
    if APPLY_SOFTMAX:
        for i in range(n_items):
            b, pix, h, w, ok = _attn_item(i, n_t, b_start, t_start, H, W, BLOCK_P, P_AXIS)
            stat_ptrs = (b * G + g) * H * W + pix
            lse_ptrs = lse_ptr + ((b * G + g) * 2 * H * W + pix)
            attn_base = attn_ptr + b * stride_attn[0] + (g * KK) * stride_attn[1]
            attn_off = h * stride_attn[2] + w * stride_attn[3]
            m, log_s = _log_normaliser(attn_base, attn_off, ok, stride_attn[1], K)
            tl.store(lse_ptrs, m, mask=ok)
            tl.store(lse_ptrs + H * W, log_s, mask=ok)
            if SOFTMAX_GRAD:
                # The softmax backward's sum_t p_t dp_t in fp32, from dp_t computed
                # exactly as the tap loop computes it (_row_prod, _row_dp): the tap loop
                # then stores each dl_t = p_t (dp_t - sum) at once, no dp is rounded or
                # stored in between, and with one tap (p = 1) dp_t - sum is exactly 0.
                mean = tl.zeros(ok.shape, tl.float32)
                for ty in range(K):
                    hh = h + (ty - R) * DIL
                    ww = w + (tx - R) * DIL
                    tap_ok = (tx < K) & ok & (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
                    if HAS_MUL:
                        mt = tl.load(mul_ptr + (ch * stride_mul[0] + ty * stride_mul[1]
                                                + tx * stride_mul[2]),
                                     mask=c_ok & (tx < K), other=0.0).to(tl.float32)
                    else:
                        mt = 1.0
                    prod = _row_prod(dout_ptr, v_ptr, b, dout_off, v_off, h, w, hh, ww, c_ok,
                                     ok, tap_ok, stride_dout, stride_v)
                    dp = _row_dp(prod, mt, HAS_MUL, C_AXIS)
                    p = tl.load(attn_base + (attn_off + (ty * K + tx) * stride_attn[1]),
                                mask=tap_ok, other=0.0).to(tl.float32)
                    # Masked taps: p = 0, not exp(0 - m - log_s) (inf when m < -88).
                    p = tl.where(tap_ok, _softmax_prob(p, m, log_s), 0.0)
                    mean += tl.sum(p * dp, axis=0, keep_dims=True)
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
            mt = tl.load(mul_ptr + (ch * stride_mul[0] + ty * stride_mul[1] + tx * stride_mul[2]),
                         mask=c_ok & (tx < K), other=0.0).to(tl.float32)
        else:
            mt = 1.0  # unread: _row_dp multiplies by M only with HAS_MUL
        acc_m = tl.zeros((K_PAD, BLOCK_P, BLOCK_C) if CHANNELS_LAST else (K_PAD, BLOCK_C, BLOCK_P),
                         tl.float32)
        acc_d = tl.zeros((K_PAD, BLOCK_P, BLOCK_C) if CHANNELS_LAST else (K_PAD, BLOCK_C, BLOCK_P),
                         tl.float32)
        for i in range(n_items):
            b, pix, h, w, ok = _attn_item(i, n_t, b_start, t_start, H, W, BLOCK_P, P_AXIS)
            hh = h + (ty - R) * DIL
            ww = w + (tx - R) * DIL
            tap_ok = (tx < K) & ok & (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
            prod = _row_prod(dout_ptr, v_ptr, b, dout_off, v_off, h, w, hh, ww, c_ok, ok, tap_ok,
                             stride_dout, stride_v)
            if NEED_DMUL or SOFTMAX_GRAD:
                p = tl.load(attn_ptr + b * stride_attn[0]
                            + ((g * KK + t) * stride_attn[1] + h * stride_attn[2]
                               + w * stride_attn[3]),
                            mask=(tx < K) & ok, other=0.0).to(tl.float32)
                if APPLY_SOFTMAX:
                    lse_ptrs = lse_ptr + ((b * G + g) * 2 * H * W + pix)
                    p = _softmax_prob(p, tl.load(lse_ptrs, mask=ok, other=0.0),
                                      tl.load(lse_ptrs + H * W, mask=ok, other=0.0))
            if NEED_DATTN:
                dp = _row_dp(prod, mt, HAS_MUL, C_AXIS)
                if SOFTMAX_GRAD:
                    dp = p * (dp - tl.load(mean_ptr + (b * G + g) * H * W + pix, mask=ok,
                                           other=0.0))
                dattn_ptrs = dattn_ptr + b * stride_dattn[0] + ((g * KK + t) * stride_dattn[1]
                                                                + h * stride_dattn[2]
                                                                + w * stride_dattn[3])
                tl.store(dattn_ptrs, dp.to(dattn_ptr.dtype.element_ty), mask=(tx < K) & ok)
            if NEED_DMUL:
                acc_m += prod * p
            if NEED_DADD:
                acc_d += prod
        if NEED_DMUL:
            tl.store(part_mul_ptr + (part_off + t), tl.sum(acc_m, axis=P_AXIS, keep_dims=True),
                     mask=c_ok & (tx < K))
        if NEED_DADD:
            tl.store(part_add_ptr + (part_off + t), tl.sum(acc_d, axis=P_AXIS, keep_dims=True),
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


