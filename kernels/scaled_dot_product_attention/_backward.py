"""The backward kernels: dq (query-major; it also forms each row's delta = rowsum(P * dP))
and dk/dv (key-major), each walking a chunk of the batch in a fixed order (no atomics)."""
import triton
import triton.language as tl

from ._dropout import _dropped, _keep_mask
from ._tiles import (_add_bias, _batch_ptr, _bias_ptrs, _head_tile, _load_rows, _logit_ptrs,
                     _probs, _row_stats, _store_rows, _wide)


@triton.jit
def _batch_coords(g, b, Z2, BCAST1: tl.constexpr, BCAST2: tl.constexpr):
    """(z1, z2, flat z) of bias group ``g`` (the non-broadcast batch dims) and broadcast
    index ``b``."""
    if BCAST1 and BCAST2:
        z1 = b // Z2
        z2 = b % Z2
    elif BCAST1:
        z1 = b
        z2 = g
    elif BCAST2:
        z1 = g
        z2 = b
    else:
        z1 = g // Z2
        z2 = g % Z2
    return z1, z2, z1 * Z2 + z2


@triton.jit
def _backward_program(n, NG, NB, B_CHUNK, BLOCK: tl.constexpr):
    """This backward program's (indices of its block of the ``n`` rows or keys, bias group
    g, split, first and end broadcast index): programs are ordered block-fastest, then
    group, then batch chunk."""
    num_blocks = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0)
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    rest = pid // num_blocks
    g = (rest % NG).to(tl.int64)
    split = rest // NG
    b_start = split.to(tl.int64) * B_CHUNK
    b_end = tl.minimum(b_start + B_CHUNK, NB)
    return offs, g, split, b_start, b_end


@triton.jit
def _dprobs(dp, keep, dropout_scale, DROPOUT: tl.constexpr):
    """dP = dO V^T through the dropout mask (the probabilities' gradient)."""
    if DROPOUT:
        dp = _dropped(dp, keep, dropout_scale)
    return dp


@triton.jit
def _dscores(p, dp, delta):
    """dS = P * (dP - delta), the logits' gradient (dP through the dropout mask)."""
    return p * (dp - delta)


@triton.jit
def _scaled_dot_product_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,
        seed_ptr, sm_scale, dropout_p, dropout_scale,
        stride_q, stride_k, stride_v, stride_bias, stride_dout, stride_dk, stride_dv,
        stride_dbias_split, stride_dbias, Z2, Nq, Nk, D, NG, NB, B_CHUNK, rel_pos_grid,
        BIAS: tl.constexpr, DBIAS: tl.constexpr, BCAST1: tl.constexpr, BCAST2: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block for each batch of a chunk; with DBIAS, the gradient of
    a bias broadcast over the queries (one value per key), summed over the chunk. Runs
    after the dq kernel, which forms delta."""
    cols, g, split, b_start, b_end = _backward_program(Nk, NG, NB, B_CHUNK, BLOCK_N)
    offs_d, mask_n, kv_mask = _head_tile(cols, Nk, D, BLOCK_D)
    dcol = tl.zeros([BLOCK_N], tl.float32)
    for i in range(0, b_end - b_start):
        z1, z2, z = _batch_coords(g, b_start + i, Z2, BCAST1, BCAST2)
        k = _load_rows(_batch_ptr(k_ptr, z1, z2, stride_k), cols, offs_d, stride_k, kv_mask,
                       OFFS64)
        v = _load_rows(_batch_ptr(v_ptr, z1, z2, stride_v), cols, offs_d, stride_v, kv_mask,
                       OFFS64)
        q_base = _batch_ptr(q_ptr, z1, z2, stride_q)
        do_base = _batch_ptr(dout_ptr, z1, z2, stride_dout)
        b_base = _batch_ptr(bias_ptr, z1, z2, stride_bias)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, Nq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            _, mask_m, qo_mask = _head_tile(rows, Nq, D, BLOCK_D)
            # Tiles are keys x queries, so that dk, dv need no transpose. q and dO are read
            # once and transposed for k q^T and v dO^T (a layout change of the dot
            # operand), not read a second time.
            q = _load_rows(q_base, rows, offs_d, stride_q, qo_mask, OFFS64)
            do = _load_rows(do_base, rows, offs_d, stride_dout, qo_mask, OFFS64)
            # Padded rows get row max +inf, hence probability 0.
            m, log2_l = _row_stats(lse_ptr, z * Nq + rows, mask_m)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale
            st = _add_bias(st, _bias_ptrs(b_base, rows[None, :], cols[:, None], stride_bias,
                                          rel_pos_grid, BIAS, OFFS64),
                           mask_n[:, None] & mask_m[None, :], BIAS)
            pt = _probs(st, m[None, :], log2_l[None, :])
            keep = _keep_mask(seed_ptr, z, rows[None, :] * Nk + cols[:, None], dropout_p,
                              DROPOUT)
            # (this order of the products is the one measured spill-free in every config)
            pdt = _dropped(pt, keep, dropout_scale) if DROPOUT else pt
            dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            delta = tl.load(delta_ptr + z * Nq + rows, mask=mask_m, other=0.0)
            dst = _dscores(pt, _dprobs(dpt, keep, dropout_scale, DROPOUT), delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
            if DBIAS:
                dcol += tl.sum(dst, 1)
        _store_rows(_batch_ptr(dk_ptr, z1, z2, stride_dk), cols, offs_d, stride_dk,
                    dk * sm_scale, kv_mask, OFFS64)
        _store_rows(_batch_ptr(dv_ptr, z1, z2, stride_dv), cols, offs_d, stride_dv, dv,
                    kv_mask, OFFS64)

    if DBIAS:
        z1, z2, _ = _batch_coords(g, b_start, Z2, BCAST1, BCAST2)
        db_base = _batch_ptr(dbias_ptr + split * _wide(stride_dbias_split, OFFS64), z1, z2,
                             stride_dbias)
        tl.store(db_base + cols * _wide(stride_dbias[3], OFFS64), dcol, mask=mask_n)


@triton.jit
def _key_block(q, do, m, log2_l, rows, mask_m, start_n, k_base, v_base, b_base,
               stride_k, stride_v, stride_bias, rel_pos_grid, seed_ptr, z, sm_scale, dropout_p,
               dropout_scale, Nk, D, BIAS: tl.constexpr, DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, OFFS64: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The dq kernel's view of the key block from ``start_n`` for its query ``rows``:
    (key indices, tile mask, keys, P, dP = dO V^T through the dropout mask)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d, mask_n, kv_mask = _head_tile(cols, Nk, D, BLOCK_D)
    tile_mask = mask_m[:, None] & mask_n[None, :]
    k = _load_rows(k_base, cols, offs_d, stride_k, kv_mask, OFFS64)
    v = _load_rows(v_base, cols, offs_d, stride_v, kv_mask, OFFS64)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
    s = _add_bias(s, _bias_ptrs(b_base, rows[:, None], cols[None, :], stride_bias,
                                rel_pos_grid, BIAS, OFFS64), tile_mask, BIAS)
    # Padded keys: -inf (probability 0); else exp(0 - m) could even overflow.
    s = tl.where(mask_n[None, :], s, float("-inf"))
    p = _probs(s, m[:, None], log2_l[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    keep = _keep_mask(seed_ptr, z, rows[:, None] * Nk + cols[None, :], dropout_p, DROPOUT)
    return cols, tile_mask, k, p, _dprobs(dp, keep, dropout_scale, DROPOUT)


@triton.jit
def _scaled_dot_product_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr,
        seed_ptr, sm_scale, dropout_p, dropout_scale,
        stride_q, stride_k, stride_v, stride_bias, stride_dout, stride_dq,
        stride_dbias_split, stride_dbias, Z2, Nq, Nk, D, NG, NB, B_CHUNK, rel_pos_grid,
        BIAS: tl.constexpr, DBIAS: tl.constexpr, DBIAS_DIRECT: tl.constexpr,
        BCAST1: tl.constexpr, BCAST2: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta and dq of one query block for each batch of a chunk; with DBIAS, the
    gradient of a bias with a query axis, summed over the chunk's batches in an fp32
    buffer that only this program touches: a read-add-write in a fixed order (no
    atomics). With DBIAS_DIRECT (one batch index, no split: its ds is the gradient)
    dbias_ptr is dbias itself, stored once in the bias dtype: no fp32 buffer and no cast
    pass.

    delta = rowsum(P * dP) / rowsum(P) (= dO . O with O unrounded) takes a first pass
    over the keys: formed from the output rounded to the input dtype, it would dominate
    dS = P (dP - delta) where that cancels (near-one-hot rows). The division makes each
    row of dS sum to 0 with the P rebuilt here, whose logits differ from the forward's
    in their last bits. The dk/dv kernel reads it."""
    rows, g, split, b_start, b_end = _backward_program(Nq, NG, NB, B_CHUNK, BLOCK_M)
    offs_d, mask_m, qo_mask = _head_tile(rows, Nq, D, BLOCK_D)
    for i in range(0, b_end - b_start):
        z1, z2, z = _batch_coords(g, b_start + i, Z2, BCAST1, BCAST2)
        q = _load_rows(_batch_ptr(q_ptr, z1, z2, stride_q), rows, offs_d, stride_q, qo_mask,
                       OFFS64)
        do = _load_rows(_batch_ptr(dout_ptr, z1, z2, stride_dout), rows, offs_d, stride_dout,
                        qo_mask, OFFS64)
        m, log2_l = _row_stats(lse_ptr, z * Nq + rows, mask_m)
        k_base = _batch_ptr(k_ptr, z1, z2, stride_k)
        v_base = _batch_ptr(v_ptr, z1, z2, stride_v)
        b_base = _batch_ptr(bias_ptr, z1, z2, stride_bias)
        delta = tl.zeros([BLOCK_M], tl.float32)
        p_sum = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, Nk, BLOCK_N):
            _, _, _, p, dp = _key_block(
                q, do, m, log2_l, rows, mask_m, start_n, k_base, v_base, b_base, stride_k,
                stride_v, stride_bias, rel_pos_grid, seed_ptr, z, sm_scale, dropout_p,
                dropout_scale, Nk, D,
                BIAS, DROPOUT, PRECISION, OFFS64, BLOCK_N, BLOCK_D)
            delta += tl.sum(p * dp, 1)
            p_sum += tl.sum(p, 1)
        # (a row with every key masked has P = 0: delta 0)
        delta = tl.where(p_sum > 0.0, delta / p_sum, 0.0)
        tl.store(delta_ptr + z * Nq + rows, delta, mask=mask_m)

        db_base = _batch_ptr(dbias_ptr + split * _wide(stride_dbias_split, OFFS64), z1, z2,
                             stride_dbias)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Nk, BLOCK_N):
            cols, tile_mask, k, p, dp = _key_block(
                q, do, m, log2_l, rows, mask_m, start_n, k_base, v_base, b_base, stride_k,
                stride_v, stride_bias, rel_pos_grid, seed_ptr, z, sm_scale, dropout_p,
                dropout_scale, Nk, D,
                BIAS, DROPOUT, PRECISION, OFFS64, BLOCK_N, BLOCK_D)
            ds = _dscores(p, dp, delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
            if DBIAS:
                ptrs = _logit_ptrs(db_base, rows[:, None], cols[None, :], stride_dbias, OFFS64)
                if DBIAS_DIRECT:
                    tl.store(ptrs, ds.to(dbias_ptr.dtype.element_ty), mask=tile_mask)
                else:
                    # The buffer is padded to whole tiles (padded entries receive ds = 0),
                    # so these accesses need no mask and stay vectorised. The first
                    # batch of the chunk starts from 0 instead of reading.
                    ds += tl.load(ptrs, mask=i > 0, other=0.0)
                    tl.store(ptrs, ds)
        _store_rows(_batch_ptr(dq_ptr, z1, z2, stride_dq), rows, offs_d, stride_dq,
                    dq * sm_scale, qo_mask, OFFS64)
