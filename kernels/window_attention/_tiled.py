"""The kernels for windows over one score tile (N > 64 slots, or > 32 with 3xTF32): a
window walked in (query block, key block) tiles as flash attention walks a sequence.
The forward runs an online softmax over key blocks; the backward takes one launch per
gradient (``_DQ``, ``_DKV``, ``_BIAS``), so that no output is shared between programs
and nothing needs atomics. The bias gather and shift mask are redone per tile."""
from typing import NamedTuple

import triton
import triton.language as tl

from ._helpers import (_BIAS, _DKV, _DQ, _bias_mask, _grid, _hat, _head_rows, _inv_norm,
                       _load_padded, _load_row_stats, _load_tokens, _normalize_bwd,
                       _program_windows, _score_gain, _scores_log2, _slots, _store_row_stats,
                       _store_tokens, _value_weights, _window_tokens)


class QueryBlock(NamedTuple):
    """A backward program's query block of one window: its ``Slots`` and ``Tokens``, q
    and dout rows, the index of its row-statistics / delta entries and the statistics
    (m, log2 l)."""
    slots: tl.tensor
    tok: tl.tensor
    q: tl.tensor
    do: tl.tensor
    row: tl.tensor
    m: tl.tensor
    log2_l: tl.tensor


@triton.jit
def _tile_slots(e, t0, prog, grid, BLOCK: tl.constexpr):
    """Slots t0 + [0, BLOCK) of the program's window ``e``: their ``Slots`` and
    ``Tokens``."""
    slots = _slots(grid, t0, BLOCK)
    return slots, _window_tokens(e, prog, grid, slots)


@triton.jit
def _window_attention_fwd_tiled_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, pad_k_ptr, pad_v_ptr, gain_ptr, out_ptr, lse_ptr,
        sizes, WINDOWS_PER_PROGRAM, window, scale, inv_scale, mask_value,
        stride_q, stride_k, stride_v,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_TABLE: tl.constexpr,
        COSINE: tl.constexpr, GRID_PARTITION: tl.constexpr):
    """Forward of one query block of the program's windows; query blocks vary fastest
    over program ids, so the programs of a window run together (its k / v from L2)."""
    grid = _grid(sizes, window, GRID_PARTITION)
    N = grid.WH * grid.WW
    n_qb = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    prog = _program_windows(pid // n_qb, grid, WINDOWS_PER_PROGRAM)
    q0 = (pid % n_qb) * BLOCK_M
    head = _head_rows(pad_k_ptr, pad_v_ptr, prog.h, grid.D, BLOCK_D)
    h, d, d_ok = prog.h, head.d, head.d_ok
    gain = _score_gain(gain_ptr, h, scale, COSINE)
    for e in range(prog.first, prog.end):
        rows, tok_q = _tile_slots(e, q0, prog, grid, BLOCK_M)
        q = _load_tokens(q_ptr, stride_q, tok_q, h, d, d_ok)
        rq = _inv_norm(q, COSINE)[0]
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_N):
            cols, tok_k = _tile_slots(e, k0, prog, grid, BLOCK_N)
            k = _load_padded(k_ptr, stride_k, head.pad_k, tok_k, h, d, d_ok)
            acc0 = _bias_mask(table_ptr, prog, grid, inv_scale, mask_value, rows, cols,
                              HAS_TABLE, False)
            s, _ = _scores_log2(q, k, acc0, rq, _inv_norm(k, COSINE)[0], gain, PRECISION, False,
                                COSINE)
            m_new = tl.maximum(m, tl.max(s, 1))
            # A -inf mask_value can hide a whole key block from a row: keep exp2 finite.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m - m_ref)
            l = l * alpha + tl.sum(p, 1)
            # The row's log-sum-exp so far: a lower bound of the final one, so a weight
            # that later blocks push below 2^-150 keeps its floor here.
            p = _value_weights(p, s, m_ref + tl.log2(l))
            v = _load_padded(v_ptr, stride_v, head.pad_v, tok_k, h, d, d_ok)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        _store_tokens(out_ptr, acc / l[:, None], tok_q, grid, h, d, d_ok, grid.HEADS * grid.D,
                      grid.D)
        _store_row_stats(lse_ptr, (tok_q.w * grid.HEADS + h) * N + rows.t, m, l, rows.in_win)


@triton.jit
def _query_block(e, q0, prog, grid, q_ptr, dout_ptr, lse_ptr, stride_q, stride_dout, head,
                 BLOCK_M: tl.constexpr):
    """The ``QueryBlock`` of slots q0 + [0, BLOCK_M) of window ``e``. Queries past N
    get m = +inf, hence p = 0; padded queries have dout = 0."""
    slots, tok = _tile_slots(e, q0, prog, grid, BLOCK_M)
    q = _load_tokens(q_ptr, stride_q, tok, prog.h, head.d, head.d_ok)
    do = _load_tokens(dout_ptr, stride_dout, tok, prog.h, head.d, head.d_ok)
    row = (tok.w * grid.HEADS + prog.h) * (grid.WH * grid.WW) + slots.t
    m, log2_l = _load_row_stats(lse_ptr, row, slots.in_win)
    return QueryBlock(slots, tok, q, do, row, m, log2_l)


@triton.jit
def _key_block(e, k0, prog, grid, k_ptr, v_ptr, stride_k, stride_v, head,
               BLOCK_N: tl.constexpr):
    """Slots k0 + [0, BLOCK_N) of window ``e``: their ``Slots`` and ``Tokens``, k and v
    rows (padded slots: the pad rows)."""
    slots, tok = _tile_slots(e, k0, prog, grid, BLOCK_N)
    k = _load_padded(k_ptr, stride_k, head.pad_k, tok, prog.h, head.d, head.d_ok)
    v = _load_padded(v_ptr, stride_v, head.pad_v, tok, prog.h, head.d, head.d_ok)
    return slots, tok, k, v


@triton.jit
def _probs_dscores(a, b, a2, b2, acc0, rq, rk, qb, delta, gain, KEYS_AS_ROWS: tl.constexpr,
                   PRECISION: tl.constexpr, COSINE: tl.constexpr):
    """P, dS and the cosine term of ``_scale_scores`` of one tile from its operands:
    (a, b, a2, b2) = (q, k, dout, v) for a (query, key) tile, (k, q, v, dout) for (key,
    query) (``KEYS_AS_ROWS``); ``rq``, ``rk``: the queries' and keys' ``_inv_norm``;
    ``qb``: the ``QueryBlock`` (its row statistics)."""
    s, c = _scores_log2(a, b, acc0, rq, rk, gain, PRECISION, KEYS_AS_ROWS, COSINE)
    dp = tl.dot(a2, tl.trans(b2), input_precision=PRECISION)
    if KEYS_AS_ROWS:
        p = tl.exp2(s - qb.m[None, :] - qb.log2_l[None, :])
        ds = p * (dp - delta[None, :])
    else:
        p = tl.exp2(s - qb.m[:, None] - qb.log2_l[:, None])
        ds = p * (dp - delta[:, None])
    return p, ds, c


@triton.jit
def _query_key_tile(e, k0, qb, rq, delta, prog, grid, k_ptr, v_ptr, table_ptr, stride_k,
                    stride_v, head, inv_scale, mask_value, gain, HAS_TABLE: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, COSINE: tl.constexpr):
    """P, dS and the cosine term (``_probs_dscores``) of the (query block ``qb``, keys
    k0 + [0, BLOCK_N)) tile of window ``e``, its k rows and their ``_inv_norm``."""
    cols, _, k, v = _key_block(e, k0, prog, grid, k_ptr, v_ptr, stride_k, stride_v, head,
                               BLOCK_N)
    acc0 = _bias_mask(table_ptr, prog, grid, inv_scale, mask_value, qb.slots, cols, HAS_TABLE,
                      False)
    rk = _inv_norm(k, COSINE)[0]
    p, ds, c = _probs_dscores(qb.q, k, qb.do, v, acc0, rq, rk, qb, delta, gain, False,
                              PRECISION, COSINE)
    return p, ds, c, k, rk


@triton.jit
def _window_attention_bwd_tiled_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, psum_ptr, table_ptr,
        pad_k_ptr, pad_v_ptr, gain_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dpad_ptr,
        dlog_gain_ptr,
        sizes, WINDOWS_PER_PROGRAM, window, scale, inv_scale, mask_value,
        stride_q, stride_k, stride_v, stride_dout, stride_dqkv_token,
        HAS_TABLE: tl.constexpr, COSINE: tl.constexpr, GRID_PARTITION: tl.constexpr,
        PASS: tl.constexpr, PAD_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One backward launch (``PASS``), each program owning one block of its windows:
    ``_DQ`` a query block: first delta_i = sum_j P dP, stored for the other passes, then
    dq over the key blocks (with ``COSINE`` also each query's share of the gradient of
    log gain, ``q_hat . dq_hat``); ``_DKV`` a key block: dk, dv over the query blocks,
    and with ``PAD_GRAD`` one ``2 x D`` partial per program of dk (with ``COSINE``: of the
    normalised keys), dv summed over padded keys;
    ``_BIAS`` one (query block, key block) tile: dS summed over the windows into the
    program's slice of its group's ``N x N`` partial dbias.

    delta comes from the recomputed fp32 tiles, not from dout . out: the output is
    rounded to the input dtype, and in half precision its rounding is a visible part of
    the small differences dP - delta. The first sweep also sums each query's
    probabilities, and delta is divided by that sum. With ``COSINE`` the scores reach
    144 (log2 units): their rounding, and the saved statistics', cost ~1e-5 of a
    probability, and probabilities that do not sum to 1 bias every gradient (the
    table's most, a sum of dS whose rows should sum to 0); so there the sums are stored
    (``psum``) and every pass divides P by them. All three passes compute the same
    (query, key) tiles (``_tiled_config``), so that the sums are of their very
    probabilities."""
    grid = _grid(sizes, window, GRID_PARTITION)
    D = grid.D
    N = grid.WH * grid.WW
    n_qb = tl.cdiv(N, BLOCK_M)
    n_kb = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    n_tiles = n_qb if PASS == _DQ else (n_kb if PASS == _DKV else n_qb * n_kb)
    rest = pid // n_tiles
    tile = pid % n_tiles
    prog = _program_windows(rest, grid, WINDOWS_PER_PROGRAM)
    head = _head_rows(pad_k_ptr, pad_v_ptr, prog.h, D, BLOCK_D)
    h, d, d_ok = prog.h, head.d, head.d_ok
    gain = _score_gain(gain_ptr, h, scale, COSINE)
    if PASS == _DKV:
        # (key, query) tiles: dk and dv come out of their dots untransposed.
        k0 = tile * BLOCK_N
        dpad_k = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dpad_v = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e in range(prog.first, prog.end):
            cols, tok_k, k, v = _key_block(e, k0, prog, grid, k_ptr, v_ptr, stride_k,
                                           stride_v, head, BLOCK_N)
            rk, ok_k = _inv_norm(k, COSINE)
            dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            for q0 in range(0, N, BLOCK_M):
                qb = _query_block(e, q0, prog, grid, q_ptr, dout_ptr, lse_ptr, stride_q,
                                  stride_dout, head, BLOCK_M)
                delta = tl.load(delta_ptr + qb.row, mask=qb.slots.in_win, other=0.0)
                if COSINE:
                    # (query, key) tiles as in the _DQ pass, whose probability sums
                    # they divide by: the same scores, bit for bit.
                    acc0 = _bias_mask(table_ptr, prog, grid, inv_scale, mask_value, qb.slots,
                                      cols, HAS_TABLE, False)
                    rq = _inv_norm(qb.q, COSINE)[0]
                    p, ds, _ = _probs_dscores(qb.q, k, qb.do, v, acc0, rq, rk, qb, delta,
                                              gain, False, PRECISION, COSINE)
                    inv_psum = 1.0 / tl.load(psum_ptr + qb.row, mask=qb.slots.in_win,
                                             other=1.0)
                    p *= inv_psum[:, None]
                    ds *= inv_psum[:, None]
                    dv += tl.dot(tl.trans(p.to(qb.do.dtype)), qb.do, input_precision=PRECISION)
                    dk += tl.dot(tl.trans(ds.to(qb.q.dtype)), _hat(qb.q, rq, COSINE),
                                 input_precision=PRECISION)
                else:
                    acc0 = _bias_mask(table_ptr, prog, grid, inv_scale, mask_value, cols,
                                      qb.slots, HAS_TABLE, True)
                    p, ds, _ = _probs_dscores(k, qb.q, v, qb.do, acc0, 1.0, 1.0, qb, delta,
                                              gain, True, PRECISION, COSINE)
                    dv += tl.dot(p.to(qb.do.dtype), qb.do, input_precision=PRECISION)
                    dk += tl.dot(ds.to(qb.q.dtype), qb.q, input_precision=PRECISION)
            dk *= gain
            if PAD_GRAD:
                dpad_k += tl.sum(tl.where(tok_k.is_pad, dk, 0.0), 0)
                dpad_v += tl.sum(tl.where(tok_k.is_pad, dv, 0.0), 0)
            if COSINE:
                dk = _normalize_bwd(k, rk, ok_k, dk)
            _store_tokens(dk_ptr, dk, tok_k, grid, h, d, d_ok, stride_dqkv_token, D)
            _store_tokens(dv_ptr, dv, tok_k, grid, h, d, d_ok, stride_dqkv_token, D)
        if PAD_GRAD:
            tl.store(dpad_ptr + pid * 2 * D + d, dpad_k, mask=d_ok)
            tl.store(dpad_ptr + (pid * 2 + 1) * D + d, dpad_v, mask=d_ok)
    else:
        q0 = (tile if PASS == _DQ else tile // n_kb) * BLOCK_M
        dbias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(prog.first, prog.end):
            qb = _query_block(e, q0, prog, grid, q_ptr, dout_ptr, lse_ptr, stride_q,
                              stride_dout, head, BLOCK_M)
            rq, ok_q = _inv_norm(qb.q, COSINE)
            psum = 1.0
            if PASS == _DQ:
                # The first sweep: the queries' probability sums and delta (see the
                # docstring); with delta 0, dS is P dP.
                psum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for kb in range(0, n_kb):
                    p, pdp, _, _, _ = _query_key_tile(
                        e, kb * BLOCK_N, qb, rq, tl.zeros((BLOCK_M,), dtype=tl.float32), prog,
                        grid, k_ptr, v_ptr, table_ptr, stride_k, stride_v, head, inv_scale,
                        mask_value, gain, HAS_TABLE, BLOCK_N, PRECISION, COSINE)
                    psum += tl.sum(p, 1)
                    delta += tl.sum(pdp, 1)
                psum = tl.where(psum > 0.0, psum, 1.0)
                delta /= psum
                tl.store(delta_ptr + qb.row, delta, mask=qb.slots.in_win)
                if COSINE:
                    tl.store(psum_ptr + qb.row, psum, mask=qb.slots.in_win)
                else:
                    psum = 1.0
                key_blocks = n_kb
                kb0 = 0
            else:
                delta = tl.load(delta_ptr + qb.row, mask=qb.slots.in_win, other=0.0)
                if COSINE:
                    psum = tl.load(psum_ptr + qb.row, mask=qb.slots.in_win, other=1.0)
                key_blocks = 1
                kb0 = tile % n_kb
            dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            dlog_gain = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for kb in range(kb0, kb0 + key_blocks):
                _, ds, c, k, rk = _query_key_tile(
                    e, kb * BLOCK_N, qb, rq, delta, prog, grid, k_ptr, v_ptr, table_ptr,
                    stride_k, stride_v, head, inv_scale, mask_value, gain, HAS_TABLE,
                    BLOCK_N, PRECISION, COSINE)
                if PASS == _DQ:
                    dq += tl.dot(ds.to(k.dtype), _hat(k, rk, COSINE), input_precision=PRECISION)
                    if COSINE:
                        # The gradient of log gain: dS * cos * gain summed in fp32 (the
                        # products round dS to half precision).
                        dlog_gain += tl.sum(ds * c, 1)
                elif COSINE:
                    dbias += ds / psum[:, None]
                else:
                    dbias += ds
            if PASS == _DQ:
                if COSINE:
                    dq = _normalize_bwd(qb.q, rq, ok_q, dq * (gain / psum)[:, None])
                    tl.store(dlog_gain_ptr + qb.row, dlog_gain * (0.6931471805599453 / psum),
                             mask=qb.slots.in_win)
                else:
                    dq *= gain
                _store_tokens(dq_ptr, dq, qb.tok, grid, h, d, d_ok, stride_dqkv_token, D)
        if PASS == _BIAS:
            i = q0 + tl.arange(0, BLOCK_M)
            j = (tile % n_kb) * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(dbias_ptr + (rest * N + i[:, None]) * N + j[None, :], dbias,
                     mask=(i < N)[:, None] & (j < N)[None, :])
