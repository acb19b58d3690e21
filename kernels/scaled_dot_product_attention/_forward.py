"""The forward kernel: one program per (query block, batch), an online softmax over the
key blocks, the output and the row statistics the backward rebuilds probabilities from."""
import triton
import triton.language as tl

from ._dropout import _dropout_keep
from ._tiles import (_LOG2E, _add_bias, _batch_ptr, _bias_ptrs, _head_tile, _load_rows,
                     _query_program, _store_rows, _wide)


@triton.jit
def _scaled_dot_product_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
        seed_ptr, sm_scale, dropout_p, dropout_scale,
        stride_q, stride_k, stride_v, stride_bias, stride_out, Z2, Nq, Nk, D, rel_pos_grid,
        BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, z, z1, z2 = _query_program(Nq, Z2, BLOCK_M)
    offs_d, mask_m, qo_mask = _head_tile(rows, Nq, D, BLOCK_D)
    q = _load_rows(_batch_ptr(q_ptr, z1, z2, stride_q), rows, offs_d, stride_q, qo_mask, OFFS64)
    k_base = _batch_ptr(k_ptr, z1, z2, stride_k)
    v_base = _batch_ptr(v_ptr, z1, z2, stride_v)
    b_base = _batch_ptr(bias_ptr, z1, z2, stride_bias)
    drop_rows = rows[:, None] * Nk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        _, mask_n, kv_mask = _head_tile(cols, Nk, D, BLOCK_D)
        # K read transposed (head dims x keys): q k^T needs no layout change.
        kt = tl.load(k_base + cols[None, :] * _wide(stride_k[2], OFFS64)
                     + offs_d[:, None] * stride_k[3],
                     mask=(offs_d < D)[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * sm_scale
        s = _add_bias(s, _bias_ptrs(b_base, rows[:, None], cols[None, :], stride_bias,
                                    rel_pos_grid, BIAS, OFFS64),
                      mask_m[:, None] & mask_n[None, :], BIAS)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with every key masked so far keep m = -inf; shift them by 0 to avoid inf - inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_ref) * _LOG2E)
        p = tl.exp2((s - m_ref[:, None]) * _LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed_ptr, z, drop_rows + cols[None, :], dropout_p), p, 0.0)
        v = _load_rows(v_base, cols, offs_d, stride_v, kv_mask, OFFS64)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_ref = tl.where(empty, 1.0, l_i)
    _store_rows(_batch_ptr(out_ptr, z1, z2, stride_out), rows, offs_d, stride_out,
                acc * (dropout_scale / l_ref)[:, None], qo_mask, OFFS64)
    stats = lse_ptr + (z * Nq + rows) * 2
    tl.store(stats, tl.where(empty, float("inf"), m_i), mask=mask_m)
    tl.store(stats + 1, tl.log2(l_ref), mask=mask_m)
