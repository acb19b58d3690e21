"""The kernels for windows of one score tile (N <= 64 slots, ``BLOCK_N``): forward and
backward. A program builds its windows' shared bias and shift mask once, as the start
of the score accumulator, then walks its windows."""
import triton
import triton.language as tl

from ._helpers import (_PAD, _QKV, _bias_mask, _grid, _hat, _head_rows, _inv_norm, _inv_norm_of,
                       _load_padded, _load_qk, _load_row_stats, _load_tokens, _normalize_bwd,
                       _program_windows, _scale_scores, _score_gain, _scores_log2, _slots,
                       _store_row_stats, _store_tokens, _value_weights, _window_tokens)


@triton.jit
def _program_setup(pid, table_ptr, pad_k_ptr, pad_v_ptr, grid, WINDOWS_PER_PROGRAM, inv_scale,
                   mask_value, HAS_TABLE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, KEYS_AS_ROWS: tl.constexpr):
    """Everything loop-invariant of program ``pid``: its ``Program``, the slots of a
    window, their ``_bias_mask`` and the ``HeadRows``."""
    prog = _program_windows(pid, grid, WINDOWS_PER_PROGRAM)
    slots = _slots(grid, 0, BLOCK_N)
    acc0 = _bias_mask(table_ptr, prog, grid, inv_scale, mask_value, slots, slots, HAS_TABLE,
                      KEYS_AS_ROWS)
    return prog, slots, acc0, _head_rows(pad_k_ptr, pad_v_ptr, prog.h, grid.D, BLOCK_D)


@triton.jit
def _window_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, pad_k_ptr, pad_v_ptr, gain_ptr, out_ptr, lse_ptr,
        sizes, WINDOWS_PER_PROGRAM, window, scale, inv_scale, mask_value,
        stride_q, stride_k, stride_v,
        HAS_TABLE: tl.constexpr, COSINE: tl.constexpr, GRID_PARTITION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Forward of the program's windows, each one tile: ``sizes``, ``window``: the
    ``Grid``'s; one stride tuple per (B, H, W, heads, D) tensor."""
    grid = _grid(sizes, window, GRID_PARTITION)
    prog, slots, acc0, head = _program_setup(
        tl.program_id(0), table_ptr, pad_k_ptr, pad_v_ptr, grid, WINDOWS_PER_PROGRAM,
        inv_scale, mask_value, HAS_TABLE, BLOCK_N, BLOCK_D, False)
    h, d, d_ok = prog.h, head.d, head.d_ok
    gain = _score_gain(gain_ptr, h, scale, COSINE)
    for e in range(prog.first, prog.end):
        tok = _window_tokens(e, prog, grid, slots)
        q, k = _load_qk(q_ptr, k_ptr, stride_q, stride_k, head.pad_k, tok, h, d, d_ok)
        s, _ = _scores_log2(q, k, acc0, _inv_norm(q, COSINE)[0], _inv_norm(k, COSINE)[0], gain,
                            PRECISION, False, COSINE)
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        lse = m + tl.log2(l)
        p = _value_weights(p, s, lse)
        v = _load_padded(v_ptr, stride_v, head.pad_v, tok, h, d, d_ok)
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l[:, None]
        _store_tokens(out_ptr, out, tok, grid, h, d, d_ok, grid.HEADS * grid.D, grid.D)
        _store_row_stats(lse_ptr, (tok.w * grid.HEADS + h) * (grid.WH * grid.WW) + slots.t, m,
                         l, slots.in_win)


@triton.jit
def _renormalized(p, COSINE: tl.constexpr):
    """Probabilities of a (key, query) tile; with ``COSINE`` each query's divided by their
    sum (the whole row is in the tile): at scores up to 144 (log2 units) the rounding of
    the scores and of the saved lse leaves sums ~1e-5 off 1, which biases every gradient
    (see the tiled backward)."""
    if COSINE:
        psum = tl.sum(p, 0)
        p = p / tl.where(psum > 0.0, psum, 1.0)[None, :]
    return p


@triton.jit
def _scores_dp_chunked(q_ptr, k_ptr, v_ptr, dout_ptr, pad_k_ptr, pad_v_ptr, acc0, tok, h, D,
                       gain, stride_q, stride_k, stride_v, stride_dout,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, COSINE: tl.constexpr):
    """Transposed log2 scores and cosines (``_scores_log2(k, q)``), dP^T = v dout^T of one
    window and its queries' ``_inv_norm``, reduced over head-dim chunks of ``BLOCK_K``: only
    chunk-wide q / k / v / dout tiles are live, which keeps wide head dims out of
    register spills. One loop per product (see docs/design/window_attention.md,
    "Chunked passes")."""
    if COSINE:
        s = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    else:
        s = acc0
    sq_q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq_k = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(0, BLOCK_D, BLOCK_K):
        d = c + tl.arange(0, BLOCK_K)
        d_ok = d < D
        pad_k = tl.load(pad_k_ptr + h * D + d, mask=d_ok, other=0.0)
        q, k = _load_qk(q_ptr, k_ptr, stride_q, stride_k, pad_k, tok, h, d, d_ok)
        s = tl.dot(k, tl.trans(q), s, input_precision=PRECISION)
        if COSINE:
            sq_q += tl.sum(q.to(tl.float32) * q.to(tl.float32), 1)
            sq_k += tl.sum(k.to(tl.float32) * k.to(tl.float32), 1)
    if COSINE:
        rq = _inv_norm_of(sq_q)[0]
        s, c = _scale_scores(s, acc0, rq, _inv_norm_of(sq_k)[0], gain, True, COSINE)
    else:
        rq = 1.0
        s, c = _scale_scores(s, acc0, 1.0, 1.0, gain, True, COSINE)
    dp = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for c in range(0, BLOCK_D, BLOCK_K):
        d = c + tl.arange(0, BLOCK_K)
        d_ok = d < D
        pad_v = tl.load(pad_v_ptr + h * D + d, mask=d_ok, other=0.0)
        do = _load_tokens(dout_ptr, stride_dout, tok, h, d, d_ok)
        v = _load_padded(v_ptr, stride_v, pad_v, tok, h, d, d_ok)
        dp = tl.dot(v, tl.trans(do), dp, input_precision=PRECISION)
    return s, c, dp, rq


@triton.jit
def _window_attention_bwd_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, table_ptr, pad_k_ptr, pad_v_ptr, gain_ptr,
        dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dpad_ptr, dlog_gain_ptr,
        sizes, WINDOWS_PER_PROGRAM, FIRST_PROGRAM, window, scale, inv_scale, mask_value,
        stride_q, stride_k, stride_v, stride_dout, stride_dqkv_token,
        HAS_TABLE: tl.constexpr, COSINE: tl.constexpr, GRID_PARTITION: tl.constexpr,
        PASS: tl.constexpr,
        BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One backward pass over this program's windows (``PASS``): ``_QKV`` writes dq, dk,
    dv (and with ``COSINE`` each query's share of the gradient of log gain,
    ``q_hat . dq_hat``); ``_PAD`` only the gradient of the pad vectors (dk, dv summed over
    padded keys; with ``COSINE`` dk of the normalised pad key), one ``2 x D`` partial per
    window, launched over the last-row / last-column programs alone; ``_BIAS`` only the
    partial dbias. ``BIAS_GRAD``: this pass sums dS into the partial dbias. ``_PAD`` and
    ``_BIAS`` walk the head dim in chunks of ``BLOCK_K``."""
    grid = _grid(sizes, window, GRID_PARTITION)
    D = grid.D
    pid = tl.program_id(0)
    # Tiles are (key, query): dv and dk come out of the dots without transposes.
    prog, slots, acc0, head = _program_setup(
        pid + FIRST_PROGRAM, table_ptr, pad_k_ptr, pad_v_ptr, grid, WINDOWS_PER_PROGRAM,
        inv_scale, mask_value, HAS_TABLE, BLOCK_N, BLOCK_D, True)
    h, d, d_ok, t = prog.h, head.d, head.d_ok, slots.t
    N = grid.WH * grid.WW
    gain = _score_gain(gain_ptr, h, scale, COSINE)
    dbias = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for e in range(prog.first, prog.end):
        tok = _window_tokens(e, prog, grid, slots)
        # Queries past N get m = +inf, hence p = 0; padded queries have dout = 0.
        m, log2_l = _load_row_stats(lse_ptr, (tok.w * grid.HEADS + h) * N + t, slots.in_win)
        if PASS == _QKV:
            q, k = _load_qk(q_ptr, k_ptr, stride_q, stride_k, head.pad_k, tok, h, d, d_ok)
            rq, ok_q = _inv_norm(q, COSINE)
            rk, ok_k = _inv_norm(k, COSINE)
            s, c = _scores_log2(k, q, acc0, rq, rk, gain, PRECISION, True, COSINE)
            p = _renormalized(tl.exp2(s - m[None, :] - log2_l[None, :]), COSINE)
            do = _load_tokens(dout_ptr, stride_dout, tok, h, d, d_ok)
            dv = tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            _store_tokens(dv_ptr, dv, tok, grid, h, d, d_ok, stride_dqkv_token, D)
            v = _load_padded(v_ptr, stride_v, head.pad_v, tok, h, d, d_ok)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        else:
            s, c, dp, rq = _scores_dp_chunked(q_ptr, k_ptr, v_ptr, dout_ptr, pad_k_ptr,
                                              pad_v_ptr, acc0, tok, h, D, gain, stride_q,
                                              stride_k, stride_v, stride_dout, BLOCK_N,
                                              BLOCK_D, BLOCK_K, PRECISION, COSINE)
            p = _renormalized(tl.exp2(s - m[None, :] - log2_l[None, :]), COSINE)
        # delta_i = sum_j p_ij dp_ij (= dout_i . out_i): the whole row is in the tile, so
        # the output need not be read.
        ds = p * (dp - tl.sum(p * dp, 0)[None, :])
        if BIAS_GRAD:
            dbias += ds
        if PASS == _QKV:
            # With COSINE, dk and dq of the normalised rows, then through the norms.
            ds_op = ds.to(q.dtype)
            dk = tl.dot(ds_op, _hat(q, rq, COSINE), input_precision=PRECISION) * gain
            if COSINE:
                dk = _normalize_bwd(k, rk, ok_k, dk)
            _store_tokens(dk_ptr, dk, tok, grid, h, d, d_ok, stride_dqkv_token, D)
            dq = tl.dot(tl.trans(ds_op), _hat(k, rk, COSINE), input_precision=PRECISION) * gain
            if COSINE:
                dq = _normalize_bwd(q, rq, ok_q, dq)
                # The gradient of log gain: each query's sum of dS * cos * gain, from the
                # fp32 tile (the products take dS rounded to half precision).
                tl.store(dlog_gain_ptr + (tok.w * grid.HEADS + h) * N + t,
                         tl.sum(ds * c, 0) * 0.6931471805599453, mask=slots.in_win)
            _store_tokens(dq_ptr, dq, tok, grid, h, d, d_ok, stride_dqkv_token, D)
        elif PASS == _PAD:
            # Summed over padded keys, dk = dS q and dv = P dout are vector-matrix
            # products: the key sums of dS and P (per query) times q and dout (with
            # COSINE: times the normalised q; the launcher takes the sum through the pad
            # key's norm).
            wk = tl.sum(tl.where(tok.is_pad, ds, 0.0), 0) * (rq * gain)
            wv = tl.sum(tl.where(tok.is_pad, p, 0.0), 0)
            slot = dpad_ptr + (pid * WINDOWS_PER_PROGRAM + e - prog.first) * 2 * D
            for c in range(0, BLOCK_D, BLOCK_K):
                dc = c + tl.arange(0, BLOCK_K)
                dc_ok = dc < D
                q = _load_tokens(q_ptr, stride_q, tok, h, dc, dc_ok)
                tl.store(slot + dc, tl.sum(wk[:, None] * q.to(tl.float32), 0), mask=dc_ok)
                do = _load_tokens(dout_ptr, stride_dout, tok, h, dc, dc_ok)
                tl.store(slot + D + dc, tl.sum(wv[:, None] * do.to(tl.float32), 0), mask=dc_ok)
    if BIAS_GRAD:
        # dbias is (key, query); the buffer is (query, key).
        pair = (t < N)[:, None] & (t < N)[None, :]
        tl.store(dbias_ptr + (pid * N + t[None, :]) * N + t[:, None], dbias, mask=pair)
