"""The backward kernels. With X_h = scale q_h k_h^T, S = mix_L(X) + b_l, P = softmax(S),
A = mix_W(P) + b_w, out_f = A_f v_f:

    dA_f = dO_f v_f^T,  dP = mix_W^T(dA),  dS_g = P_g (dP_g - delta_g),  dX = mix_L^T(dS),
    delta_g = rowsum(P_g dP_g),  dq_h = scale dX_h k_h,  dk_h = scale dX_h^T q_h,
    dv_f = A_f^T dO_f,  dW[f, g] = sum dA_f P_g,  db_w[f] = sum dA_f,  dL[g, h] = sum dS_g X_h

(db_l is exactly 0: b_l[g] shifts every logit of head g). The dq kernel runs first: a
pass over the keys forms delta, a second one dq. The dk kernel reads delta and writes,
per program, its partial sums of dL, dW and db_w, which the launcher adds in a fixed
order (no atomics: deterministic); the dv kernel needs only A. dk and dv are separate
kernels, each holding one (heads, keys, head dim) accumulator in registers."""
import triton
import triton.language as tl

from ._tiles import (_dprobs, _head, _head_vector, _load_tile, _logits, _mix, _probs,
                     _program, _row_offsets, _row_stats, _store_tile)


@triton.jit
def _tile_grads(q_ptr, k_ptr, v_ptr, l_ptr, w_ptr, dout_ptr, bl, m, log2_l, b, rows, cols,
                sm_scale, stride_q, stride_k, stride_v, stride_dout, H, N, D,
                PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(X, P, dA, dP) of the (query ``rows``, key ``cols``) tile of every head, P rebuilt
    from the forward's row statistics (m, log2_l)."""
    x, s = _logits(q_ptr, k_ptr, l_ptr, bl, b, rows, cols, sm_scale, stride_q, stride_k, H, N,
                   D, PRECISION, BLOCK_H, BLOCK_D)
    da, dp = _dprobs(dout_ptr, v_ptr, w_ptr, b, rows, cols, stride_dout, stride_v, H, N, D,
                     PRECISION, BLOCK_H, BLOCK_D)
    return x, _probs(s, m, log2_l), da, dp


@triton.jit
def _talking_heads_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, l_ptr, bl_ptr, w_ptr, dout_ptr, stats_ptr, delta_ptr, dq_ptr,
        sm_scale, stride_q, stride_k, stride_v, stride_dout, stride_dq, H, N, D,
        PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, rows = _program(N, BLOCK_M)
    bl = _head_vector(bl_ptr, H, BLOCK_H)
    m, log2_l = _row_stats(stats_ptr, b, rows, H, N, BLOCK_H)

    # delta = sum_j P dP / sum_j P: the division cancels the rounding of the recomputed
    # probabilities' sum.
    p_dp = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)
    p_sum = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        _, p, _, dp = _tile_grads(q_ptr, k_ptr, v_ptr, l_ptr, w_ptr, dout_ptr, bl, m, log2_l, b,
                                  rows, cols, sm_scale, stride_q, stride_k, stride_v,
                                  stride_dout, H, N, D, PRECISION, BLOCK_H, BLOCK_D)
        p_dp += tl.sum(p * dp, 2)
        p_sum += tl.sum(p, 2)
    delta = p_dp / tl.where(p_sum == 0.0, 1.0, p_sum)

    dq = tl.zeros([BLOCK_H, BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        _, p, _, dp = _tile_grads(q_ptr, k_ptr, v_ptr, l_ptr, w_ptr, dout_ptr, bl, m, log2_l, b,
                                  rows, cols, sm_scale, stride_q, stride_k, stride_v,
                                  stride_dout, H, N, D, PRECISION, BLOCK_H, BLOCK_D)
        dx = _mix(p * (dp - delta[:, :, None]), l_ptr, H, True)
        k = _load_tile(k_ptr, b, cols, H, N, D, stride_k, BLOCK_H, BLOCK_D, False)
        dq = tl.dot(dx.to(k.dtype), k, dq, input_precision=PRECISION)

    _store_tile(dq_ptr, b, rows, H, N, D, stride_dq, dq * sm_scale, BLOCK_H, BLOCK_D)
    offs, mask = _row_offsets(b, rows, H, N, BLOCK_H)
    tl.store(delta_ptr + offs, delta, mask=mask)


@triton.jit
def _talking_heads_attention_bwd_dv_kernel(
        q_ptr, k_ptr, l_ptr, bl_ptr, w_ptr, bw_ptr, dout_ptr, stats_ptr, dv_ptr, sm_scale,
        stride_q, stride_k, stride_dout, stride_dv, H, N, D,
        PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, cols = _program(N, BLOCK_N)
    bl = _head_vector(bl_ptr, H, BLOCK_H)
    bw = _head_vector(bw_ptr, H, BLOCK_H)
    dv = tl.zeros([BLOCK_H, BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        m, log2_l = _row_stats(stats_ptr, b, rows, H, N, BLOCK_H)
        _, s = _logits(q_ptr, k_ptr, l_ptr, bl, b, rows, cols, sm_scale, stride_q, stride_k,
                       H, N, D, PRECISION, BLOCK_H, BLOCK_D)
        # Padding query rows have dO = 0: their A (b_w) adds nothing.
        a = _mix(_probs(s, m, log2_l), w_ptr, H, False) + bw[:, None, None]
        do = _load_tile(dout_ptr, b, rows, H, N, D, stride_dout, BLOCK_H, BLOCK_D, False)
        dv = tl.dot(tl.permute(a, (0, 2, 1)).to(do.dtype), do, dv, input_precision=PRECISION)
    _store_tile(dv_ptr, b, cols, H, N, D, stride_dv, dv, BLOCK_H, BLOCK_D)


@triton.jit
def _talking_heads_attention_bwd_dk_kernel(
        q_ptr, k_ptr, v_ptr, l_ptr, bl_ptr, w_ptr, dout_ptr, stats_ptr, delta_ptr, dk_ptr,
        dmix_ptr, sm_scale, stride_q, stride_k, stride_v, stride_dout, stride_dk, H, N, D,
        PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, cols = _program(N, BLOCK_N)
    bl = _head_vector(bl_ptr, H, BLOCK_H)
    heads = tl.arange(0, BLOCK_H)
    dk = tl.zeros([BLOCK_H, BLOCK_N, BLOCK_D], tl.float32)
    # This program's partial sums: dL[g, h], dW[f, g], db_w[f].
    dl = tl.zeros([BLOCK_H, BLOCK_H], tl.float32)
    dw = tl.zeros([BLOCK_H, BLOCK_H], tl.float32)
    dbw = tl.zeros([BLOCK_H], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        m, log2_l = _row_stats(stats_ptr, b, rows, H, N, BLOCK_H)
        offs, mask = _row_offsets(b, rows, H, N, BLOCK_H)
        delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
        x, p, da, dp = _tile_grads(q_ptr, k_ptr, v_ptr, l_ptr, w_ptr, dout_ptr, bl, m, log2_l,
                                   b, rows, cols, sm_scale, stride_q, stride_k, stride_v,
                                   stride_dout, H, N, D, PRECISION, BLOCK_H, BLOCK_D)
        ds = p * (dp - delta[:, :, None])
        dx = _mix(ds, l_ptr, H, True)
        q = _load_tile(q_ptr, b, rows, H, N, D, stride_q, BLOCK_H, BLOCK_D, False)
        dk = tl.dot(tl.permute(dx, (0, 2, 1)).to(q.dtype), q, dk, input_precision=PRECISION)

        dbw += tl.sum(tl.sum(da, 2), 1)
        for g in range(H):
            column = (heads == g)[None, :]
            dw += tl.where(column, tl.sum(tl.sum(da * _head(p, g)[None, :, :], 2), 1)[:, None],
                           0.0)
            dl += tl.where(column, tl.sum(tl.sum(ds * _head(x, g)[None, :, :], 2), 1)[:, None],
                           0.0)

    _store_tile(dk_ptr, b, cols, H, N, D, stride_dk, dk * sm_scale, BLOCK_H, BLOCK_D)
    # dmix: (programs, 2 H + 1, H) fp32 rows dL, dW, db_w.
    part = dmix_ptr + tl.program_id(0).to(tl.int64) * (2 * H + 1) * H
    square = heads[:, None] * H + heads[None, :]
    square_mask = (heads < H)[:, None] & (heads < H)[None, :]
    tl.store(part + square, dl, mask=square_mask)
    tl.store(part + H * H + square, dw, mask=square_mask)
    tl.store(part + 2 * H * H + heads, dbw, mask=heads < H)
